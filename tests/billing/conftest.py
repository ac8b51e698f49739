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
import time
import uuid

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

django.setup()

from tests import browser as browser_fixtures  # noqa: E402
from tests.conftest import STRIPE_WEBHOOK_SECRET as WEBHOOK_SECRET  # noqa: E402
from tests.conftest import use_stripe  # noqa: E402
from tests.platform.conftest import local_host  # noqa: E402, F401 - a fixture for these tests

# The browser's fixtures (tests/browser.py), for the card form's test.
orm_beside_playwright = browser_fixtures.orm_beside_playwright
browser = browser_fixtures.browser
console = browser_fixtures.console
visitor = browser_fixtures.visitor

WEBHOOK_ID = "vtpu-tests"


@pytest.fixture(autouse=True)
def stripe_settings(settings, localstripe, tmp_path):
    use_stripe(settings, localstripe)
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
    """Billing's tasks sent by name run at once, in-process, through Celery's own task objects;
    every name sent is recorded (other apps' tasks, such as provisioning jobs, only that)."""
    import billing.tasks  # noqa: F401 - registers the tasks with the app
    from controlplane.celery import app
    from fleet.services import queue

    sent: list[tuple] = []

    def send_task(name, *args, **options):
        sent.append((name, args))
        if name.startswith("billing."):  # provisioning jobs are only recorded, never run here
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


def set_default_card(account, number: str):
    """Make a test card the account's default straight through the Stripe API (a card that
    would fail or need 3-D Secure as a SetupIntent, for testing what happens at payment)."""
    from billing.models import BillingCustomer
    from billing.services import customer_ensure
    from billing.stripe_client import stripe_client

    client = stripe_client()
    customer = customer_ensure(account=account)
    method = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    client.v1.payment_methods.attach(method.id, params={"customer": customer.stripe_customer_id})
    client.v1.customers.update(
        customer.stripe_customer_id,
        params={"invoice_settings": {"default_payment_method": method.id}},
    )
    BillingCustomer.objects.filter(pk=customer.pk).update(
        payment_method_id=method.id, card_last4=number[-4:]
    )


@pytest.fixture
def plan(db):
    """The default plan, mirrored to this session's Stripe server."""
    from billing.services import plan_default_ensure, plan_sync

    return plan_sync(plan=plan_default_ensure())


@pytest.fixture
def committed(django_capture_on_commit_callbacks):
    """Run a call and then what it left for after its commit (queued tasks, the quantity's
    sync), as a real commit would."""

    def run(call, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return call(*args, **kwargs)

    return run


def order(api, name: str, **extra):
    from django.urls import reverse

    return api.post(reverse("node-list"), {"name": name, **extra}, format="json")


def make_ready(node):
    """What a provisioning job and the agent's first heartbeat do to a node."""
    from fleet.models import JobState
    from fleet.services.transitions import node_transition

    node_transition(node=node, to_state="provisioning", cause="test: job started")
    node_transition(node=node, to_state="ready", cause="test: first heartbeat")
    node.jobs.update(state=JobState.SUCCESSFUL)
