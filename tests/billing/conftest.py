"""Fixtures of the billing tests: a REAL local Stripe API server (localstripe, started once per
session with --from-scratch and always stopped), the settings pointing the Stripe client at it,
Celery tasks run in-process by name (the broker is the only stand-in), customers, and signed
webhook requests.

localstripe keeps a copy of its state in a fixed file (/tmp/localstripe.pickle) that it
rewrites on every write; with --from-scratch it never reads it, so parallel runs do not see
each other's objects (../shared/STRIPE.md).
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

django.setup()

WEBHOOK_SECRET = "whsec_vtpu_tests"
SECRET_KEY = "sk_test_vtpu"
WEBHOOK_ID = "vtpu-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory):
    """The base URL of a localstripe server of this session."""
    executable = Path(sys.executable).with_name("localstripe")
    if not executable.exists():
        pytest.fail(f"{executable} is missing: install the dev extra (localstripe)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(executable), "--port", str(port), "--from-scratch"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/v1/customers", auth=(SECRET_KEY, ""), timeout=2)
                break
            except requests.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"localstripe did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


@pytest.fixture(autouse=True)
def stripe_settings(settings, localstripe, tmp_path):
    settings.STRIPE_SECRET_KEY = SECRET_KEY
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_vtpu"
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = localstripe
    settings.STRIPE_MAX_NETWORK_RETRIES = 0  # a 500 is an answer here, not a reason to resend
    settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS = 300
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"billing-{tmp_path.name}",
        }
    }
    return settings


@pytest.fixture(autouse=True)
def tasks(monkeypatch):
    """Tasks sent by name run at once, in-process, through Celery's own task objects; the names
    sent are recorded."""
    import billing.tasks  # noqa: F401 - registers the tasks with the app
    from controlplane.celery import app
    from fleet.services import queue

    sent: list[tuple] = []

    def send_task(name, *args, **options):
        sent.append((name, args))
        app.tasks[name].apply(args=args)
        return True

    monkeypatch.setattr(queue, "send_task", send_task)
    return sent


@pytest.fixture
def stripe_api():
    """The Stripe client our code uses, for checking what reached the server."""
    from billing.stripe_client import stripe_client

    return stripe_client()


@pytest.fixture
def customer(db):
    """A customer (user and account) with a name of its own: localstripe's state lasts the
    whole session."""
    from tests.platform.conftest import make_customer

    return make_customer(f"c{uuid.uuid4().hex[:10]}")


@pytest.fixture
def handler_calls(monkeypatch):
    """Every call of the customer.created handler, by event id (the real handler still runs)."""
    from billing import events

    calls: list[str] = []
    real = events._HANDLERS["customer.created"]

    def counting(event: dict) -> str:
        calls.append(event["id"])
        return real(event)

    monkeypatch.setitem(events._HANDLERS, "customer.created", counting)
    return calls


def signed(payload: dict, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None):
    """A webhook body and its Stripe-Signature header, signed the way Stripe signs."""
    import stripe

    body = json.dumps(payload, indent=2)
    header = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp)
    return body.encode(), header


def customer_event(stripe_customer_id: str, *, event_type: str = "customer.created") -> dict:
    return {
        "id": f"evt_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": event_type,
        "api_version": "2017-08-15",
        "created": int(time.time()),
        "data": {"object": {"id": stripe_customer_id, "object": "customer"}},
    }


@pytest.fixture
def register_webhook(localstripe):
    """Make localstripe deliver events to a URL; undone afterwards (registrations cannot be
    deleted, so it is pointed at an event type that never happens)."""

    def register(url: str, events: list[str]) -> None:
        reply = requests.post(
            f"{localstripe}/_config/webhooks/{WEBHOOK_ID}",
            json={"url": url, "secret": WEBHOOK_SECRET, "events": events},
            timeout=5,
        )
        reply.raise_for_status()

    yield register
    register("http://127.0.0.1:9/unused", ["vtpu.never"])
