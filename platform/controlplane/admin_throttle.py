"""Sign-in pages, throttled (the admin's, and the customers' /accounts/login/): after
ADMIN_LOGIN_MAX_FAILURES failed attempts for one user name from one address within
ADMIN_LOGIN_WINDOW_SECONDS, further attempts get 429 with Retry-After until the window ends.
Counted in Django's cache (Redis), in fixed windows shared by both pages."""

import hashlib
import time

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from rest_framework.throttling import BaseThrottle

from controlplane.csp import with_policy


def _client_address(request: HttpRequest) -> str:
    # The API throttles' notion of the client (REMOTE_ADDR, or X-Forwarded-For by NUM_PROXIES).
    return BaseThrottle().get_ident(request)


def _failures_key(request: HttpRequest, window: int) -> str:
    username = request.POST.get("username", "").strip().lower()
    who = hashlib.sha256(f"{_client_address(request)}\0{username}".encode()).hexdigest()
    return f"admin-login-failures:{window}:{who}"


def _throttled(request: HttpRequest, login, signed_in) -> HttpResponse:
    """`login(request)`, refusing a POST once its address and user name failed too often;
    `signed_in(request)` says whether the attempt succeeded."""
    if request.method != "POST":
        return login(request)
    period = settings.ADMIN_LOGIN_WINDOW_SECONDS
    now = time.time()
    window = int(now // period)
    key = _failures_key(request, window)
    if cache.get(key, 0) >= settings.ADMIN_LOGIN_MAX_FAILURES:
        retry_after = max(1, int((window + 1) * period - now) + 1)
        response = HttpResponse(
            f"Too many failed sign-in attempts for this user name from your address. Try again"
            f" in {retry_after} s.\n",
            status=429,
            content_type="text/plain; charset=utf-8",
        )
        response["Retry-After"] = str(retry_after)
        return response
    response = login(request)
    if not signed_in(request):
        # A failed attempt (the form again, 200); the key lives as long as its window.
        cache.add(key, 0, timeout=period + 1)
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=period + 1)
    return response


def throttled_login(request: HttpRequest, extra_context=None) -> HttpResponse:
    """admin.site.login, throttled: only staff sign in there."""
    return _throttled(
        request,
        lambda r: admin.site.login(r, extra_context),
        lambda r: r.user.is_authenticated and r.user.is_staff,
    )


_customer_login = LoginView.as_view(
    template_name="accounts/login.html", redirect_authenticated_user=True
)


def throttled_customer_login(request: HttpRequest) -> HttpResponse:
    """Everyone's sign-in page (customers and staff), throttled like the admin's, under the
    portal's Content-Security-Policy."""
    response = _throttled(request, _customer_login, lambda r: r.user.is_authenticated)
    return with_policy(response)
