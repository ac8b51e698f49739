"""Secrets at rest (SSH private keys, node tokens): Fernet with a key derived from settings.

FIELD_ENCRYPTION_KEY is free text (a file or an env value); sha256 of it gives the 32 bytes a
Fernet key needs, so operators need not produce Fernet's exact format.
"""

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.db import models


@lru_cache(maxsize=4)
def _fernet(key_material: str) -> Fernet:
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(key_material.encode()).digest()))


def fernet() -> Fernet:
    return _fernet(settings.FIELD_ENCRYPTION_KEY)


def encrypt(text: str) -> str:
    return fernet().encrypt(text.encode()).decode()


def decrypt(ciphertext: str) -> str:
    try:
        return fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise ValueError(
            "An encrypted field cannot be decrypted: FIELD_ENCRYPTION_KEY changed since it was"
            " written. Restore the old key or enter the secret again."
        ) from None


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
