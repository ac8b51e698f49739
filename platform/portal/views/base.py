"""What every portal page shares: the signed-in user's account (404 for anything else's), the
page's Content-Security-Policy, and rendering with htmx partials."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from accounts import selectors as account_selectors
from accounts.models import Account
from controlplane.csp import with_policy


def account_of(request: HttpRequest) -> Account:
    """The signed-in user's active account; 404 when there is none (a staff user without one)."""
    account = account_selectors.account_of_user(user=request.user)
    if account is None or not account.is_active:
        raise Http404("Your user belongs to no active account.")
    return account


def page(
    request: HttpRequest,
    template: str,
    context: dict | None = None,
    *,
    status: int = 200,
    stripe: bool = False,
) -> HttpResponse:
    """Render a portal page (or, for an htmx request, the same template: templates pick their
    partial with `request.htmx`) under the portal's Content-Security-Policy."""
    response = render(request, template, context or {}, status=status)
    return with_policy(response, stripe=stripe)
