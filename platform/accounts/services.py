"""Writes for accounts: accounts with their owner, members, quotas, and API tokens (a secret
shown once, only its hash stored)."""

import hashlib
import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from accounts.models import Account, ApiToken, Membership, User
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
