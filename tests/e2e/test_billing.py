"""Billing end to end, with real parts only: the control plane as the run command starts it in
test mode (gunicorn, Celery worker and beat, a private Redis, its own local Stripe API server
delivering real signed webhooks to it), a card saved through a SetupIntent, a paid node
provisioned by Ansible with a running agent, a failed renewal that Stripe reports by webhook, the
agent suspended after the grace period (keeping its heartbeats) and working again within a
minute of the payment."""

from __future__ import annotations

import time

import pytest
import requests
import stripe

from controlplane.stack import LOCAL_STRIPE_SECRET_KEY, Stack, free_port, stop_local_agents
from tests.e2e.conftest import (
    Api,
    agent_get,
    create_host,
    drop_e2e_database,
    e2e_database_url,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def billed(tmp_path_factory, node_wheel):
    var = tmp_path_factory.mktemp("e2e-billing")
    wheels = var / "wheels"
    wheels.mkdir()
    (wheels / node_wheel.name).write_bytes(node_wheel.read_bytes())
    stack = Stack(
        var,
        port=free_port(),
        log_to_files=True,
        local_stripe=True,
        stripe_from_scratch=True,
        env={
            "DATABASE_URL": e2e_database_url(var, "_billing"),
            "REDIS_URL": "",
            "HEARTBEAT_SECONDS": "2",
            "PROVISIONING_JOB_TIMEOUT": "600",
            "BENCHMARK_SIZE": "tiny",
        },
    )
    stack.env.pop("REDIS_URL")
    stack.start_private_redis()
    with stack.running():
        create_host(stack, "this-machine", "--local", "--ports", "19300-19309")
        yield stack
    stop_local_agents(var / "nodes")
    drop_e2e_database(stack.env["DATABASE_URL"])
    for log in sorted((var / "logs").glob("*.log")):
        print(f"----- {log.name} (tail)\n" + "\n".join(log.read_text().splitlines()[-30:]))


def save_card(stack: Stack, api: Api, number: str) -> dict:
    """What the card page does, with the SetupIntent confirmed by the Stripe client instead of
    Stripe.js in a browser (that part is tests/billing/test_card_browser.py)."""
    status, intent = api.call("POST", "/api/v1/billing/setup-intent")
    assert status == 201, intent
    client = stripe.StripeClient(
        LOCAL_STRIPE_SECRET_KEY, base_addresses={"api": stack.stripe_base}, max_network_retries=0
    )
    method = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    client.v1.setup_intents.confirm(intent["id"], params={"payment_method": method.id})
    status, saved = api.call(
        "POST", "/api/v1/billing/payment-method", {"setup_intent": intent["id"]}
    )
    assert status == 200, saved
    return saved["card"]


def shell(stack: Stack, code: str) -> str:
    done = stack.manage("shell", "-c", code)
    return done.stdout.strip()


def test_paid_node_suspended_for_non_payment_and_resumed_within_a_minute(billed):
    stack = billed
    done = stack.manage("create_customer", "payer", "--token", "e2e")
    payer = Api(stack.url, done.stdout.strip().splitlines()[-1].split()[-1])

    status, refused = payer.call("POST", "/api/v1/nodes", {"name": "paid"})
    assert status == 402 and "Add a card first" in refused["detail"]
    assert save_card(stack, payer, "4242424242424242")["last4"] == "4242"

    status, node = payer.call("POST", "/api/v1/nodes", {"name": "paid"})
    assert status == 201 and node["payment"]["state"] == "paid", node
    node = payer.wait_for_state(node["id"], {"ready", "failed"})
    assert node["state"] == "ready", node
    creds = payer.call("GET", f"/api/v1/nodes/{node['id']}/credentials")[1]
    assert agent_get(creds["agent_url"], "/vTPU/health", creds["token"])[1]["suspended"] is False

    # A renewal fails: the card asks for 3-D Secure, is authenticated, then declines. Stripe's
    # own webhook (invoice.payment_failed) makes the account past due.
    client = stripe.StripeClient(
        LOCAL_STRIPE_SECRET_KEY, base_addresses={"api": stack.stripe_base}, max_network_retries=0
    )
    failing = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": "4000008260003178", "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    ids = shell(
        stack,
        "from billing.models import BillingCustomer, Subscription;"
        "c = BillingCustomer.objects.get(account__memberships__user__username='payer');"
        "s = Subscription.objects.get(account=c.account, ended_at=None);"
        "print(c.stripe_customer_id, s.stripe_subscription_id)",
    ).split()
    customer_id, subscription_id = ids[-2], ids[-1]
    client.v1.payment_methods.attach(failing.id, params={"customer": customer_id})
    client.v1.customers.update(
        customer_id, params={"invoice_settings": {"default_payment_method": failing.id}}
    )
    invoice = client.v1.invoices.create(
        params={"customer": customer_id, "subscription": subscription_id}
    )
    invoice = client.v1.invoices.pay(invoice.id, params={"expand": ["payment_intent"]})
    intent = invoice["payment_intent"]
    requests.post(
        f"{stack.stripe_base}/v1/payment_intents/{intent['id']}/_authenticate",
        data={"client_secret": intent["client_secret"], "success": "true", "key": "pk_test_x"},
        timeout=10,
    )
    billing = wait_for(
        lambda: (b := payer.call("GET", "/api/v1/billing")[1])["standing"] == "past_due" and b,
        30,
        "past due standing from Stripe's invoice.payment_failed webhook",
    )
    assert billing["suspend_at"]

    # Past the grace period (the sweep is run as if 8 days had passed), the node is suspended:
    # its agent refuses work, keeps its state and keeps heartbeating.
    shell(
        stack,
        "from datetime import timedelta; from django.utils import timezone;"
        "from billing.dunning import dunning_sweep;"
        "print(dunning_sweep(now=timezone.now() + timedelta(days=8)))",
    )
    assert payer.call("GET", f"/api/v1/nodes/{node['id']}")[1]["state"] == "suspended"
    wait_for(
        lambda: agent_get(creds["agent_url"], "/vTPU/health", creds["token"])[1]["suspended"],
        30,
        "the agent learning it is suspended",
    )
    refused = requests.post(
        creds["agent_url"] + "/vTPU/benchmark",
        json={"size": "tiny"},
        headers={"Authorization": f"Bearer {creds['token']}"},
        timeout=30,
    )
    assert refused.status_code == 503 and "suspended" in refused.json()["error"]
    seen = payer.call("GET", f"/api/v1/nodes/{node['id']}")[1]["last_heartbeat_at"]
    wait_for(
        lambda: payer.call("GET", f"/api/v1/nodes/{node['id']}")[1]["last_heartbeat_at"] != seen,
        20,
        "a heartbeat of the suspended node",
    )

    # A new card pays the open invoice at once; the agent works again within a minute.
    paid_at = time.monotonic()
    save_card(stack, payer, "4242424242424242")
    assert payer.call("GET", "/api/v1/billing")[1]["standing"] == "good"
    wait_for(
        lambda: not agent_get(creds["agent_url"], "/vTPU/health", creds["token"])[1]["suspended"],
        60,
        "the agent resumed within a minute of the payment",
    )
    resumed_in = time.monotonic() - paid_at
    print(f"\npayment to a working agent: {resumed_in:.1f} s")
    assert payer.call("GET", f"/api/v1/nodes/{node['id']}")[1]["state"] == "ready"
    invoices = payer.call("GET", "/api/v1/billing/invoices")[1]["results"]
    assert [i["status"] for i in invoices].count("paid") >= 2 and not [
        i for i in invoices if i["status"] == "open"
    ]
