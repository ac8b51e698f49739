"""The secrets of nodes and enrollment links: 256 bits from `secrets`, stored as SHA-256 only
(an access token is also kept encrypted, because its account may read it again)."""

import hashlib
import secrets


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(nbytes: int = 32) -> tuple[str, str]:
    """A fresh secret and its SHA-256."""
    secret = secrets.token_urlsafe(nbytes)
    return secret, hash_secret(secret)


def new_access_token() -> dict[str, str]:
    """Node fields for a new customer access token."""
    token, digest = new_secret()
    return {"access_token": token, "access_token_sha256": digest}
