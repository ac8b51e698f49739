"""The admin's sign-in, throttled: after ADMIN_LOGIN_MAX_FAILURES failed attempts for one user
name from one address within ADMIN_LOGIN_WINDOW_SECONDS, further attempts get 429 with
Retry-After until the window ends. Counted in Django's cache (Redis), in fixed windows."""

import hashlib
import time

from django.conf import settings
from django.contrib import admin
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from rest_framework.throttling import BaseThrottle


def _client_address(request: HttpRequest) -> str:
    # The API throttles' notion of the client (REMOTE_ADDR, or X-Forwarded-For by NUM_PROXIES).
    return BaseThrottle().get_ident(request)


def _failures_key(request: HttpRequest, window: int) -> str:
    username = request.POST.get("username", "").strip().lower()
    who = hashlib.sha256(f"{_client_address(request)}\0{username}".encode()).hexdigest()
    return f"admin-login-failures:{window}:{who}"


def throttled_login(request: HttpRequest, extra_context=None) -> HttpResponse:
    """admin.site.login, refusing a POST once its address and user name failed too often."""
    if request.method != "POST":
        return admin.site.login(request, extra_context)
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
    response = admin.site.login(request, extra_context)
    if not request.user.is_authenticated or not request.user.is_staff:
        # A failed attempt (the form again, 200); the key lives as long as its window.
        cache.add(key, 0, timeout=period + 1)
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=period + 1)
    return response
