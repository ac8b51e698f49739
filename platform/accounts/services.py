"""Writes for accounts: accounts with their owner, members, quotas, API tokens (a secret
shown once, only its hash stored), signing up, and invitations to an account (a one-time
e-mailed link, only its hash stored)."""

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from accounts.models import Account, ApiToken, Invitation, Membership, User
from controlplane.errors import ServiceError

TOKEN_PREFIX = "vtpu_"


class AccountError(ServiceError):
    """A request about accounts that is refused, with a sentence for people."""

    status = 400


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@transaction.atomic
def account_create(*, name: str, owner: User, node_quota: int | None = None) -> Account:
    """A new account with `owner` as its owner. A person belongs to one account."""
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise AccountError("An account name is 1 to 100 characters.", field="name")
    if Membership.objects.filter(user=owner).exists():
        raise AccountError(f"{owner.get_username()} already belongs to an account.")
    fields = {} if node_quota is None else {"node_quota": node_quota}
    account = Account.objects.create(name=name, **fields)
    Membership.objects.create(account=account, user=owner, role=Membership.Role.OWNER)
    return account


@transaction.atomic
def member_add(*, account: Account, user: User, role: str = Membership.Role.MEMBER) -> Membership:
    if role not in Membership.Role.values:
        raise AccountError(f"Unknown role {role!r}; use owner or member.", field="role")
    if Membership.objects.filter(user=user).exists():
        raise AccountError(f"{user.get_username()} already belongs to an account.")
    return Membership.objects.create(account=account, user=user, role=role)


@transaction.atomic
def customer_create(*, username: str, email: str = "", account_name: str | None = None) -> User:
    """A person and their own account (sign-up, and the operator's create_customer)."""
    user = get_user_model().objects.create_user(username=username, email=email)
    account_create(name=account_name or username, owner=user)
    return user


@transaction.atomic
def account_set_quota(*, account: Account, node_quota: int) -> Account:
    """Staff raise (or lower) how many live nodes an account may have."""
    if node_quota < 0:
        raise AccountError("A quota is 0 or more nodes.", field="node_quota")
    Account.objects.filter(pk=account.pk).update(node_quota=node_quota)
    account.refresh_from_db()
    return account


@dataclass(frozen=True)
class CreatedToken:
    token: ApiToken
    secret: str  # shown to the customer once, never stored


@transaction.atomic
def token_create(*, account: Account, user: User, name: str) -> CreatedToken:
    """A new token acting for `account`, created by `user`. The clear secret exists only in the
    return value."""
    random_part = secrets.token_urlsafe(32)
    secret = TOKEN_PREFIX + random_part
    token = ApiToken.objects.create(
        account=account,
        user=user,
        name=name.strip(),
        prefix=random_part[:8],
        sha256=hash_secret(secret),
    )
    return CreatedToken(token=token, secret=secret)


@transaction.atomic
def token_revoke(*, token: ApiToken) -> ApiToken:
    """Revoke once; revoking again keeps the first revocation time (idempotent DELETE)."""
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db()
    return token


# ---- signing up and invitations ---------------------------------------------------------------

INVITATION_DAYS = 7
MAX_PENDING_INVITATIONS = 20


class NotAllowed(AccountError):
    status = 403


class InvitationUnknown(AccountError):
    status = 404


class InvitationGone(AccountError):
    status = 410


def _user_create(*, username: str, email: str, password: str) -> User:
    """A person with a password, after the checks a sign-up form needs, each naming its field."""
    users = get_user_model().objects
    username = get_user_model().normalize_username((username or "").strip())
    if not username or len(username) > 150:
        raise AccountError("Choose a user name of 1 to 150 characters.", field="username")
    try:
        UnicodeUsernameValidator()(username)
    except ValidationError:
        raise AccountError(
            "A user name has letters, digits and @ . + - _ only (no spaces).", field="username"
        ) from None
    if users.filter(username__iexact=username).exists():
        raise AccountError("That user name is taken: choose another.", field="username")
    email = users.normalize_email((email or "").strip())
    try:
        validate_email(email)
    except ValidationError:
        raise AccountError(
            "Enter an e-mail address such as name@example.com.", field="email"
        ) from None
    if users.filter(email__iexact=email).exists():
        raise AccountError(
            "A user with this e-mail address exists already: sign in, or reset your password.",
            field="email",
        )
    user = get_user_model()(username=username, email=email)
    try:
        validate_password(password or "", user)
    except ValidationError as exc:
        raise AccountError(" ".join(exc.messages), field="password") from None
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:  # the same name, signed up at the same moment
        raise AccountError("That user name is taken: choose another.", field="username") from None
    return user


@transaction.atomic
def customer_sign_up(*, username: str, email: str, password: str, account_name: str) -> User:
    """A person signing up on the portal: their user and their own account, as its owner."""
    name = (account_name or "").strip()
    if not name or len(name) > 100:
        raise AccountError(
            "Name your account (your company or your own name), up to 100 characters.",
            field="account_name",
        )
    user = _user_create(username=username, email=email, password=password)
    account_create(name=name, owner=user)
    return user


def is_owner(*, account: Account, user: User) -> bool:
    return Membership.objects.filter(
        account=account, user_id=user.pk, role=Membership.Role.OWNER
    ).exists()


@transaction.atomic
def member_invite(*, account: Account, by: User, email: str) -> Invitation:
    """The account's owner invites a person by e-mail: a link (PUBLIC_URL) that lets them set a
    password and join, usable once within INVITATION_DAYS. The mail leaves after the commit."""
    if not is_owner(account=account, user=by):
        raise NotAllowed("Only the account's owner invites members.")
    email = get_user_model().objects.normalize_email((email or "").strip())
    try:
        validate_email(email)
    except ValidationError:
        raise AccountError(
            "Enter an e-mail address such as name@example.com.", field="email"
        ) from None
    if get_user_model().objects.filter(email__iexact=email).exists():
        raise AccountError(
            f"{email} already has a vTPU Cloud user; a person belongs to one account.",
            field="email",
        )
    now = timezone.now()
    pending = Invitation.objects.filter(account=account, accepted_at=None, expires_at__gt=now)
    if pending.count() >= MAX_PENDING_INVITATIONS:
        raise AccountError(
            f"An account has at most {MAX_PENDING_INVITATIONS} open invitations; wait until"
            " some are used or expire.",
            field="email",
        )
    secret = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        account=account,
        email=email,
        invited_by=by,
        sha256=hash_secret(secret),
        expires_at=now + timedelta(days=INVITATION_DAYS),
    )
    link = settings.PUBLIC_URL.rstrip("/") + reverse(
        "invitation-accept", kwargs={"invitation_id": invitation.pk, "secret": secret}
    )
    body = (
        f"{by.get_username()} invites you to join {account.name} on vTPU Cloud.\n\n"
        f"Choose a user name and a password here (the link works once, until"
        f" {invitation.expires_at:%Y-%m-%d %H:%M} UTC):\n\n{link}\n\n"
        "If you did not expect this, ignore this mail.\n"
    )
    transaction.on_commit(
        lambda: send_mail(
            f"Join {account.name} on vTPU Cloud", body, settings.DEFAULT_FROM_EMAIL, [email]
        )
    )
    return invitation


def invitation_check(*, invitation_id: int, secret: str) -> Invitation:
    """The invitation a link names, if the link is right (compared in constant time) and still
    usable; otherwise a refusal that says why."""
    invitation = Invitation.objects.select_related("account").filter(pk=invitation_id).first()
    if invitation is None or not hmac.compare_digest(invitation.sha256, hash_secret(secret or "")):
        raise InvitationUnknown(
            "This invitation link is not valid: check that you copied all of it from the mail."
        )
    if invitation.accepted_at is not None:
        raise InvitationGone("This invitation was used already: sign in instead.")
    if invitation.expires_at <= timezone.now() or not invitation.account.is_active:
        raise InvitationGone(
            "This invitation has expired: ask the account's owner to invite you again."
        )
    return invitation


@transaction.atomic
def invitation_accept(*, invitation_id: int, secret: str, username: str, password: str) -> User:
    """The invitee's user, a member of the inviting account; the invitation is used up."""
    invitation = invitation_check(invitation_id=invitation_id, secret=secret)
    user = _user_create(username=username, email=invitation.email, password=password)
    claimed = Invitation.objects.filter(pk=invitation.pk, accepted_at=None).update(
        accepted_at=timezone.now(), accepted_by=user
    )
    if claimed != 1:  # accepted at the same moment in another request: undo this user
        raise InvitationGone("This invitation was used already: sign in instead.")
    Membership.objects.create(account=invitation.account, user=user, role=Membership.Role.MEMBER)
    return user
