"""A customer is a Django user; an API token lets their scripts act for them.

Only a token's SHA-256 is stored: a database leak gives no usable secret. The token is long and
random (256 bits), so a plain hash (no salt, no stretching) is enough and lookups stay indexed.
"""

from django.conf import settings
from django.db import models


class ApiToken(models.Model):
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
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} (vtpu_{self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
