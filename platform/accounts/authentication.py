"""DRF authentication by API token: `Authorization: Bearer vtpu_<secret>`.

The secret is hashed and looked up by its hash; the stored hash is compared again with
hmac.compare_digest so that no step of the check depends on how many characters matched.
"""

import hmac
from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions

from accounts.models import ApiToken
from accounts.services import TOKEN_PREFIX, hash_secret

# last_used_at is informative: one write a minute per token is enough, not one per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != self.keyword.lower():
            return None  # another scheme: let the next authenticator decide
        secret = secret.strip()
        if not secret.startswith(TOKEN_PREFIX):
            raise exceptions.AuthenticationFailed(
                "This is not a vTPU Cloud API token (they start with 'vtpu_')."
            )
        digest = hash_secret(secret)
        token = ApiToken.objects.select_related("user", "account").filter(sha256=digest).first()
        if token is None or not hmac.compare_digest(token.sha256, digest):
            raise exceptions.AuthenticationFailed("Unknown API token.")
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This API token was revoked.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("The user of this token is disabled.")
        if not token.account.is_active:
            raise exceptions.AuthenticationFailed("This account is disabled.")
        now = timezone.now()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        return token.user, token

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) to unauthenticated requests.
        return f'{self.keyword} realm="api"'
