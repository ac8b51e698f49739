"""The one place that configures the Stripe client (settings STRIPE_*; docs/architecture.md,
"Billing"). Every call to Stripe goes through `stripe_client()`: a `stripe.StripeClient` built
from the settings, so no code sets the `stripe.api_key` / `stripe.api_base` globals.

STRIPE_API_BASE points it at a local Stripe API server (localstripe, ../shared/STRIPE.md);
unset, it talks to Stripe itself.
"""

from __future__ import annotations

import functools

import stripe
from django.conf import settings

from controlplane.errors import ServiceError


class StripeNotConfigured(ServiceError):
    status = 503


def stripe_configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def stripe_client() -> stripe.StripeClient:
    """The client for the current settings (built once per distinct configuration)."""
    if not stripe_configured():
        raise StripeNotConfigured(
            "Billing is off: set STRIPE_SECRET_KEY (or STRIPE_SECRET_KEY_FILE), and"
            " STRIPE_API_BASE for a local Stripe API server."
        )
    return _client(
        settings.STRIPE_SECRET_KEY, settings.STRIPE_API_BASE, settings.STRIPE_MAX_NETWORK_RETRIES
    )


@functools.lru_cache(maxsize=4)
def _client(key: str, api_base: str, retries: int) -> stripe.StripeClient:
    return stripe.StripeClient(
        key,
        base_addresses={"api": api_base} if api_base else None,
        max_network_retries=retries,
    )


def is_missing(exc: stripe.StripeError) -> bool:
    """Stripe answered that the object does not exist (deleted, or never ours)."""
    return isinstance(exc, stripe.InvalidRequestError) and exc.http_status == 404
