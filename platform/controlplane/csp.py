"""The Content-Security-Policy of every page people see (docs/architecture.md, "Billing" and
"Portal"): scripts, styles and images from this site only, no inline script or style, nothing
from a CDN; a page that collects a card also allows Stripe.js (its origin for scripts and
frames, the Stripe API for calls) — the local server's in test mode, Stripe's own otherwise."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpResponse

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


def content_security_policy(
    *, stripe: bool = False, stripe_js_url: str | None = None, stripe_api_base: str | None = None
) -> str:
    """The page's policy; with `stripe`, Stripe.js (from STRIPE_JS_URL, calling STRIPE_API_BASE
    or Stripe's API) is allowed too."""
    scripts, frames, connect = ["'self'"], [], ["'self'"]
    if stripe:
        js_origin = _origin(stripe_js_url or settings.STRIPE_JS_URL)
        api_base = settings.STRIPE_API_BASE if stripe_api_base is None else stripe_api_base
        scripts.append(js_origin)
        frames.append(js_origin)
        if js_origin == STRIPE_JS_ORIGIN:
            scripts += STRIPE_EXTRA_SCRIPT_SOURCES
            frames += STRIPE_EXTRA_FRAME_SOURCES
        connect.append(_origin(api_base) if api_base else STRIPE_API_ORIGIN)
    directives = {
        "default-src": ["'none'"],
        "script-src": scripts,
        "connect-src": connect,
        "frame-src": frames or ["'none'"],
        "img-src": ["'self'"],
        "style-src": ["'self'"],
        "form-action": ["'self'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    return "; ".join(f"{name} {' '.join(sources)}" for name, sources in directives.items())


def with_policy(response: HttpResponse, *, stripe: bool = False) -> HttpResponse:
    response["Content-Security-Policy"] = content_security_policy(stripe=stripe)
    return response
