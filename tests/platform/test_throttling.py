"""Rate limits against a real Redis: per API token, per address for anonymous callers and
agents, and failed admin sign-ins per address and user name; over a limit, 429 + Retry-After."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.response import Response
from rest_framework.test import APIClient, APIRequestFactory
from rest_framework.views import APIView

from accounts.services import token_create

pytestmark = pytest.mark.django_db

REDIS_CACHE = "django.core.cache.backends.redis.RedisCache"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server of this session, else db 15 of the local one, else skip."""
    server = shutil.which("redis-server")
    if server is None:
        if _answers(6379):
            yield "redis://127.0.0.1:6379/15"
            return
        pytest.skip("no Redis: install redis-server or run one on 127.0.0.1:6379")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not _answers(port):
            assert process.poll() is None and time.monotonic() < deadline, "redis-server failed"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def rates(settings, redis_url):
    """Django's cache on that Redis, emptied, and low rates; returns the rates to change."""
    from django.core.cache import cache

    settings.CACHES = {"default": {"BACKEND": REDIS_CACHE, "LOCATION": redis_url}}
    cache.clear()  # no count left over from another test
    limits = {"token": "3/min", "anon": "2/min", "agent": "4/min"}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": limits}
    settings.ADMIN_LOGIN_MAX_FAILURES = 3
    settings.ADMIN_LOGIN_WINDOW_SECONDS = 300
    yield limits
    cache.clear()


def bearer(secret: str, **defaults) -> APIClient:
    client = APIClient(**defaults)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def make_user(name: str, **extra):
    """A person with an account of their own (the API acts for accounts)."""
    from accounts.services import account_create

    user = get_user_model().objects.create_user(name, f"{name}@example.com", f"pw-{name}", **extra)
    account_create(name=f"{name} Co", owner=user)
    return user


def assert_throttled(reply) -> None:
    assert reply.status_code == 429, reply.content
    assert 0 < int(reply["Retry-After"]) <= 60


def test_an_api_token_is_limited_to_its_rate(rates):
    user = make_user("tess")
    account = user.membership.account
    first, second = (
        token_create(account=account, user=user, name=n).secret for n in ("one", "two")
    )
    client = bearer(first)
    for _ in range(3):
        assert client.get("/api/v1/tokens").status_code == 200
    assert_throttled(client.get("/api/v1/tokens"))
    # Counted per token: the same user's other token, from the same address, still works.
    assert bearer(second).get("/api/v1/tokens").status_code == 200


def test_a_session_is_limited_per_user(rates):
    user = make_user("sid")
    client = APIClient()
    client.force_login(user)
    for _ in range(3):
        assert client.get("/api/v1/tokens").status_code == 200
    assert_throttled(client.get("/api/v1/tokens"))


def test_anonymous_enroll_attempts_are_limited_per_address(rates):
    from api.views import EnrollView

    # The agents' rate once enroll is an agent view (throttle_scope), else the anonymous one.
    scope = "agent" if getattr(EnrollView, "throttle_scope", None) == "agent" else "anon"
    burst = int(rates[scope].split("/")[0])
    client = APIClient(REMOTE_ADDR="198.51.100.7")
    body = {"secret": "not-a-real-secret", "hostname": "n1"}
    for _ in range(burst):
        assert client.post("/api/v1/enroll", body, format="json").status_code != 429
    assert_throttled(client.post("/api/v1/enroll", body, format="json"))
    # Another address has its own count.
    other = APIClient(REMOTE_ADDR="198.51.100.8")
    assert other.post("/api/v1/enroll", body, format="json").status_code != 429


def test_a_forged_forwarded_for_does_not_escape_the_limit(rates):
    body = {"secret": "not-a-real-secret", "hostname": "n1"}
    replies = [
        APIClient(REMOTE_ADDR="198.51.100.9", HTTP_X_FORWARDED_FOR=f"10.0.0.{i}").post(
            "/api/v1/enroll", body, format="json"
        )
        for i in range(10)
    ]
    assert replies[-1].status_code == 429  # NUM_PROXIES=0: the peer address counts


def test_behind_one_proxy_the_forwarded_client_counts(rates, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    body = {"secret": "not-a-real-secret", "hostname": "n1"}
    for i in range(10):  # ten clients behind the proxy at 127.0.0.1, one request each
        client = APIClient(REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")
        assert client.post("/api/v1/enroll", body, format="json").status_code != 429


class AgentView(APIView):
    authentication_classes: list = []
    permission_classes: list = []
    throttle_scope = "agent"

    def post(self, request):
        return Response({"ok": True})


class OpenView(AgentView):
    throttle_scope = None


def test_agent_views_have_their_own_higher_rate(rates):
    factory = APIRequestFactory()
    agent, other = AgentView.as_view(), OpenView.as_view()
    statuses = [agent(factory.post("/x", REMOTE_ADDR="192.0.2.5")).status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 200, 429]  # 4/min, and not the anonymous 2/min
    statuses = [other(factory.post("/y", REMOTE_ADDR="192.0.2.5")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # the anonymous rate, counted apart from the agents'


def test_failed_admin_sign_ins_are_limited_per_address_and_user_name(rates):
    make_user("root", is_staff=True, is_superuser=True)
    client = Client(REMOTE_ADDR="203.0.113.50")
    wrong = {"username": "root", "password": "guess", "next": "/admin/"}
    for _ in range(3):
        reply = client.post("/admin/login/", wrong)
        assert reply.status_code == 200 and b"Please enter the correct" in reply.content
    reply = client.post("/admin/login/", wrong)
    assert reply.status_code == 429
    assert 0 < int(reply["Retry-After"]) <= 301
    # Locked for this user name from this address, even with the right password...
    right = {**wrong, "password": "pw-root"}
    assert client.post("/admin/login/", right).status_code == 429
    # ...but not from another address, and the sign-in page itself still loads.
    elsewhere = Client(REMOTE_ADDR="203.0.113.51")
    assert elsewhere.post("/admin/login/", right).status_code == 302
    assert client.get("/admin/login/").status_code == 200


def test_customers_sign_in_on_their_own_page_throttled_like_the_admins(rates):
    make_user("carol")
    client = Client(REMOTE_ADDR="203.0.113.60")
    assert client.get("/billing/card")["Location"] == "/accounts/login/?next=/billing/card"
    page = client.get("/accounts/login/?next=/billing/card")
    assert page.status_code == 200 and b'for="id_username"' in page.content
    assert "script-src 'self';" in page["Content-Security-Policy"]
    wrong = {"username": "carol", "password": "guess", "next": "/billing/card"}
    for _ in range(3):
        reply = client.post("/accounts/login/", wrong)
        assert reply.status_code == 200 and b'role="alert"' in reply.content
    assert client.post("/accounts/login/", wrong).status_code == 429
    elsewhere = Client(REMOTE_ADDR="203.0.113.61")
    signed_in = elsewhere.post("/accounts/login/", {**wrong, "password": "pw-carol"})
    assert signed_in.status_code == 302 and signed_in["Location"] == "/billing/card"
    # A customer still cannot use the admin.
    assert elsewhere.get("/admin/")["Location"].startswith("/admin/login/")
    assert elsewhere.post("/accounts/logout/").status_code == 302
    assert elsewhere.get("/billing/card").status_code == 302
