"""GET /billing/card: the page where a signed-in customer gives a card.

Stripe.js collects the card in the browser and confirms a SetupIntent with Stripe, so the card
number goes to Stripe only; the page's script (static/billing/card.js) then asks our API
(/api/v1/billing/...) to make that card the account's default. The page carries no inline
script: its Content-Security-Policy allows scripts from this site and Stripe.js's origin only.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from billing.stripe_client import stripe_configured

# What Stripe.js needs from a page's policy when it comes from Stripe itself: its scripts and
# frames on js.stripe.com and its subdomains, 3-D Secure pages on hooks.stripe.com, and calls to
# api.stripe.com (Stripe's guide to Content-Security-Policy).
STRIPE_JS_ORIGIN = "https://js.stripe.com"
STRIPE_API_ORIGIN = "https://api.stripe.com"
STRIPE_EXTRA_SCRIPT_SOURCES = ("https://*.js.stripe.com",)
STRIPE_EXTRA_FRAME_SOURCES = ("https://*.js.stripe.com", "https://hooks.stripe.com")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(*, stripe_js_url: str, stripe_api_base: str) -> str:
    """Scripts from this site and Stripe.js's origin only, no inline script or style; calls to
    this site and the Stripe API; frames from Stripe.js (its card fields and 3-D Secure)."""
    js_origin = _origin(stripe_js_url)
    scripts = ["'self'", js_origin]
    frames = [js_origin]
    if js_origin == STRIPE_JS_ORIGIN:
        scripts += STRIPE_EXTRA_SCRIPT_SOURCES
        frames += STRIPE_EXTRA_FRAME_SOURCES
    api_origin = _origin(stripe_api_base) if stripe_api_base else STRIPE_API_ORIGIN
    directives = {
        "default-src": ["'none'"],
        "script-src": scripts,
        "connect-src": ["'self'", api_origin],
        "frame-src": frames,
        "img-src": ["'self'"],
        "style-src": ["'self'"],
        "form-action": ["'self'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(sources)}" for name, sources in directives.items())


@require_safe
@login_required
def card(request: HttpRequest) -> HttpResponse:
    enabled = stripe_configured() and bool(settings.STRIPE_PUBLISHABLE_KEY)
    response = render(
        request,
        "billing/card.html",
        {
            "enabled": enabled,
            "stripe_js_url": settings.STRIPE_JS_URL,
            "test_mode": settings.STRIPE_PUBLISHABLE_KEY.startswith("pk_test_"),
        },
    )
    response["Content-Security-Policy"] = content_security_policy(
        stripe_js_url=settings.STRIPE_JS_URL, stripe_api_base=settings.STRIPE_API_BASE
    )
    # The card form is never cached, by the browser or a proxy.
    response["Cache-Control"] = "no-store"
    return response
