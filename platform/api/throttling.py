"""Request rates of the API, counted in Django's cache (Redis), one bucket per caller.

Three throttles, each answering for its own callers only (DRF asks every one of them):
- TokenRateThrottle: an authenticated request, per API token (per user with a session);
- AnonRateThrottle: an anonymous request to an ordinary view, per client address;
- AgentRateThrottle: a view with `throttle_scope = "agent"` (heartbeats, enrollment), per
  client address, at a higher rate: nodes behind one NAT share an address.
Rates are REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][scope], read at each request (so settings
overrides apply). The client address is DRF's get_ident: REMOTE_ADDR, or the X-Forwarded-For
entry NUM_PROXIES from the end. Over a rate DRF answers 429 with Retry-After.
"""

import logging

from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

log = logging.getLogger(__name__)
AGENT_SCOPE = "agent"


def _is_agent_view(view) -> bool:
    return getattr(view, "throttle_scope", None) == AGENT_SCOPE


class _ConfiguredRate(SimpleRateThrottle):
    """Fails open: with the cache (Redis) unreachable a request is let through and the outage
    logged, so a broker/cache restart never turns every API call into a 500 (docs/architecture.md,
    "Queues": a request made while Redis is down still answers)."""

    def allow_request(self, request, view) -> bool:
        try:
            return super().allow_request(request, view)
        except Exception as exc:  # redis.ConnectionError, TimeoutError, ...: the cache's own
            log.warning("throttling skipped: the cache is unreachable (%s)", exc)
            return True

    def get_rate(self) -> str | None:
        # DRF reads THROTTLE_RATES once, at import; this follows settings changes.
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def key(self, ident: str) -> str:
        return self.cache_format % {"scope": self.scope, "ident": ident}


class TokenRateThrottle(_ConfiguredRate):
    scope = "token"

    def get_cache_key(self, request, view) -> str | None:
        if _is_agent_view(view) or not (request.user and request.user.is_authenticated):
            return None
        token_pk = getattr(request.auth, "pk", None)  # accounts.models.ApiToken
        if token_pk is not None:
            return self.key(f"token-{token_pk}")
        return self.key(f"user-{request.user.pk}")


class AnonRateThrottle(_ConfiguredRate):
    scope = "anon"

    def get_cache_key(self, request, view) -> str | None:
        if _is_agent_view(view) or (request.user and request.user.is_authenticated):
            return None
        return self.key(self.get_ident(request))


class AgentRateThrottle(_ConfiguredRate):
    scope = AGENT_SCOPE

    def get_cache_key(self, request, view) -> str | None:
        if not _is_agent_view(view):
            return None
        return self.key(self.get_ident(request))
