"""Writes for accounts: API tokens are created with a secret shown once, and revoked."""

import hashlib
import secrets
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiToken

TOKEN_PREFIX = "vtpu_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedToken:
    token: ApiToken
    secret: str  # shown to the customer once, never stored


@transaction.atomic
def token_create(*, user: AbstractBaseUser, name: str) -> CreatedToken:
    """A new token for `user`. The clear secret exists only in the return value."""
    random_part = secrets.token_urlsafe(32)
    secret = TOKEN_PREFIX + random_part
    token = ApiToken.objects.create(
        user=user, name=name.strip(), prefix=random_part[:8], sha256=hash_secret(secret)
    )
    return CreatedToken(token=token, secret=secret)


@transaction.atomic
def token_revoke(*, token: ApiToken) -> ApiToken:
    """Revoke once; revoking again keeps the first revocation time (idempotent DELETE)."""
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db()
    return token
