"""GET /billing/card: the page where a signed-in customer gives a card.

Stripe.js collects the card in the browser and confirms a SetupIntent with Stripe, so the card
number goes to Stripe only; the page's script (static/billing/card.js) then asks our API
(/api/v1/billing/...) to make that card the account's default. The page carries no inline
script: its Content-Security-Policy allows scripts from this site and Stripe.js's origin only.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_safe

from billing.stripe_client import stripe_configured
from controlplane.csp import content_security_policy


@require_safe
@login_required
def card(request: HttpRequest) -> HttpResponse:
    enabled = stripe_configured() and bool(settings.STRIPE_PUBLISHABLE_KEY)
    # Where the customer came from (a portal page that needs a card): a link back, this site's only.
    next_url = request.GET.get("next", "")
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
        next_url = ""
    response = render(
        request,
        "billing/card.html",
        {
            "enabled": enabled,
            "stripe_js_url": settings.STRIPE_JS_URL,
            "test_mode": settings.STRIPE_PUBLISHABLE_KEY.startswith("pk_test_"),
            "next_url": next_url,
        },
    )
    response["Content-Security-Policy"] = content_security_policy(stripe=True)
    # The card form is never cached, by the browser or a proxy.
    response["Cache-Control"] = "no-store"
    return response
