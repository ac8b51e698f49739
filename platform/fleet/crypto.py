"""Secrets at rest (SSH private keys, node tokens): Fernet with keys derived from settings.

FIELD_ENCRYPTION_KEY holds one or more keys, separated by commas or newlines. Each is free text;
sha256 of it gives the 32 bytes a Fernet key needs, so operators need not produce Fernet's exact
format. The first key encrypts, every key decrypts (MultiFernet): to rotate, put a new key first,
keep the old ones after it, run `manage.py rotate_encryption_keys`, then drop the old ones.
"""

import base64
import hashlib
import re
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.db import models


def key_list(key_material: str) -> list[str]:
    """The keys in FIELD_ENCRYPTION_KEY's text, newest (the encrypting one) first."""
    keys = [key.strip() for key in re.split(r"[,\n]", key_material) if key.strip()]
    if not keys:
        raise ValueError("FIELD_ENCRYPTION_KEY holds no key")
    return keys


def _derive(key: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))


@lru_cache(maxsize=4)
def _fernets(key_material: str) -> tuple[MultiFernet, Fernet]:
    keys = [_derive(key) for key in key_list(key_material)]
    return MultiFernet(keys), keys[0]


def fernet() -> MultiFernet:
    """Encrypts with the first key, decrypts with any."""
    return _fernets(settings.FIELD_ENCRYPTION_KEY)[0]


def encrypt(text: str) -> str:
    return fernet().encrypt(text.encode()).decode()


def decrypt(ciphertext: str) -> str:
    try:
        return fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise ValueError(
            "An encrypted field cannot be decrypted with any key in FIELD_ENCRYPTION_KEY: it was"
            " written under a key that is no longer there. Add that key back (after the current"
            " one, comma-separated) or enter the secret again."
        ) from None


def is_current(ciphertext: str) -> bool:
    """Whether the first (encrypting) key reads it, i.e. rotation has nothing to do."""
    try:
        _fernets(settings.FIELD_ENCRYPTION_KEY)[1].decrypt(ciphertext.encode())
    except InvalidToken:
        return False
    return True


class EncryptedTextField(models.TextField):
    """Text stored as a Fernet token; Python code only ever sees the clear text."""

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        return decrypt(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(value)
