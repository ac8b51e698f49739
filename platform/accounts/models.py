"""Who uses the product: people (User), the organisations they act for (Account), which people
belong to which account and with what role (Membership), and the API tokens scripts use.

Every customer-facing thing (nodes, tokens, enrollments, later the billing customer) belongs to an
Account, never to a person: a member who leaves takes nothing with them. Staff are users with
`is_staff`; they need no account to run the admin. See docs/architecture.md, "Accounts".

Only a token's SHA-256 is stored: a database leak gives no usable secret. The token is long and
random (256 bits), so a plain hash (no salt, no stretching) is enough and lookups stay indexed.
"""

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


def default_node_quota() -> int:
    return settings.DEFAULT_NODE_QUOTA


class User(AbstractUser):
    """A person who logs in: a member of one account (through Membership), or staff."""

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"


class Account(models.Model):
    """An organisation (a company or a person) that owns nodes and pays for them."""

    name = models.CharField(max_length=100)
    node_quota = models.PositiveIntegerField(
        default=default_node_quota, help_text="Most live (not terminated) nodes at once."
    )
    is_active = models.BooleanField(default=True, help_text="A disabled account cannot act.")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A person's place in an account. One account per person for now (user is unique)."""

    class Role(models.TextChoices):
        OWNER = "owner"
        MEMBER = "member"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="memberships")
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="membership"
    )
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["account", "created"]

    def __str__(self) -> str:
        return f"{self.user} ({self.role} of {self.account})"


class ApiToken(models.Model):
    """A script's credential: acts for `account`; `user` is who created it."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="api_tokens")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, help_text="What the customer uses this token for.")
    prefix = models.CharField(
        max_length=8, help_text="First characters of the secret, shown to recognise a token."
    )
    sha256 = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.name} (vtpu_{self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class Invitation(models.Model):
    """An owner's invitation of a person to their account: an e-mailed one-time link that lets
    the invitee set a password and join. Only the link secret's SHA-256 is stored (like a
    token's); it is usable once, before `expires_at`."""

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField(help_text="Where the link was sent; the new member's address.")
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    sha256 = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.email} to {self.account}"
