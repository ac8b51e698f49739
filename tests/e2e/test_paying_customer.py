"""A paying customer, end to end, against the real stack in billing's test mode (gunicorn, Celery
worker and beat, a private Redis, the local Stripe server delivering real signed webhooks and its
Stripe.js, Ansible, real agents); one stack for the module (`billed`).

1. In a real browser (Debian's chromium through Playwright, tests/browser.py): a customer signs
   up, saves a card (declined, then 3-D Secure, then good), deploys a node and watches its
   provisioning log stream until the node is ready and its charts draw its heartbeats'
   telemetry; brings their own machine with the copied command; sees an alert once the first
   node's agent is killed. Another customer gets 404 on that node's page and is kept out of
   /staff/.
2. Through the API: a paid node; a failed renewal that Stripe reports by webhook; the agent
   suspended after the grace period (keeping its heartbeats) and working again within a minute
   of the payment."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import stripe
from playwright.sync_api import expect

from controlplane.stack import LOCAL_STRIPE_SECRET_KEY, Stack, free_port
from tests import browser as browser_fixtures
from tests.browser import TIMEOUT_MS, script_errors
from tests.e2e.conftest import Api, agent_get, process_alive, wait_for

# Chromium for this module only (tests/browser.py says why not pytest-playwright's).
orm_beside_playwright = browser_fixtures.orm_beside_playwright
browser = browser_fixtures.browser

pytestmark = pytest.mark.slow

DECLINED_CARD = "4000000000000002"
THREE_D_SECURE_CARD = "4000002500003155"
GOOD_CARD = "4242424242424242"


def new_page(chromium, stack: Stack, console: list[str]):
    context = chromium.new_context(base_url=stack.url)
    context.set_default_timeout(TIMEOUT_MS)
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.on("console", lambda message: console.append(message.text))
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    return page


def sign_up(page, stack: Stack, name: str) -> None:
    page.goto("/accounts/signup/")
    page.get_by_label("Account name").fill(f"{name.title()} Labs")
    page.get_by_label("User name").fill(name)
    page.get_by_label("E-mail address").fill(f"{name}@example.com")
    page.get_by_label("Password").fill(f"{name}s long passphrase")
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(f"{stack.url}/")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def type_card(page, number: str) -> None:
    """Key by key into the local Stripe.js card fields (plain inputs named by placeholder)."""
    form = page.locator("#card-element")
    for field, value in [
        ("number", number),
        ("exp_month", "12"),
        ("exp_year", "34"),
        ("cvc", "123"),
        ("postal_code", "10115"),
    ]:
        box = form.get_by_placeholder(field, exact=True)
        box.fill("")
        box.press_sequentially(value)


def saved_card(page) -> dict | None:
    """The account's card as GET /api/v1/billing tells the browser's own session."""
    reply = page.request.get("/api/v1/billing")
    assert reply.status == 200, reply.text()
    return reply.json()["card"]


def chart_points(page, key: str) -> int:
    chart = page.locator(f'[data-chart="{key}"]')
    expect(chart).to_have_attribute("data-points", re.compile(r"\d+"))
    return int(chart.get_attribute("data-points"))


def test_a_customer_signs_up_pays_deploys_enrolls_and_sees_an_alert(billed, browser, tmp_path):
    stack = billed
    console: list[str] = []
    page = new_page(browser, stack, console)
    started = time.monotonic()
    sign_up(page, stack, "carla")

    # A card: declined (said so, nothing saved), 3-D Secure (Stripe.js's dialog, then saved),
    # then a good one, which becomes the card the nodes are paid with.
    page.goto("/billing/card")
    save = page.get_by_role("button", name="Save card")
    expect(save).to_be_enabled()
    type_card(page, DECLINED_CARD)
    save.click()
    expect(page.get_by_role("status")).to_have_text("Your card was declined.")
    expect(page.locator("#current-card")).to_have_text("No card yet.")
    assert saved_card(page) is None

    type_card(page, THREE_D_SECURE_CARD)
    save.click()
    page.get_by_role("button", name="Complete authentication").click()
    expect(page.get_by_role("status")).to_have_text("Card ending 3155 saved.")
    assert saved_card(page)["last4"] == "3155"

    type_card(page, GOOD_CARD)
    save.click()
    expect(page.get_by_role("status")).to_have_text("Card ending 4242 saved.")
    expect(page.locator("#current-card")).to_contain_text("4242")
    assert saved_card(page)["last4"] == "4242"

    # Deploy a node on the default plan, paid with that card.
    page.goto("/nodes/new/")
    page.get_by_label("Name").fill("web-1")
    page.get_by_role("button", name="Deploy and pay").click()
    expect(page.get_by_text("Node web-1 ordered.")).to_be_visible()
    node_id = re.search(r"/nodes/([0-9a-f-]{36})/", page.url).group(1)

    # Ansible's events stream into the log without a reload while the job runs.
    log = page.locator("ol.log").first
    seen: list[int] = []
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and not log.locator("li.log-end").count():
        lines = log.locator("li .log-task").count()
        if not seen or lines != seen[-1]:
            seen.append(lines)
        time.sleep(0.5)
    expect(log.locator("li.log-end")).to_have_text("Job successful")
    assert len([n for n in seen if n > 0]) >= 2, f"line counts seen while running: {seen}"
    expect(page.locator("#node-state")).to_have_text("ready", timeout=60_000)
    ready_in = time.monotonic() - started
    expect(page.locator("#agent-url")).to_contain_text("http://")

    # Its charts draw what its heartbeats brought.
    def charts_drawn() -> bool:
        page.reload()
        return chart_points(page, "power_watts mops_per_watt") > 0 and chart_points(page, "up")

    wait_for(charts_drawn, 90, "telemetry points in the node's charts", interval=3)

    # Bring your own machine: the copied command, run here, enrolls this machine.
    page.goto("/nodes/enroll/")
    page.get_by_role("button", name="Make my command").click()
    page.get_by_role("button", name="Copy the command").click()
    expect(page.locator("#copy-status")).to_have_text("Copied to the clipboard.")
    command = page.evaluate("() => navigator.clipboard.readText()")
    assert command == page.locator("#enroll-command").inner_text().strip()
    assert command.startswith(f"curl -fsSL {stack.url}/enroll/") and command.endswith("| sh")
    machine = tmp_path / "my-machine"
    env = {**os.environ, "VTPU_NODE_DIR": str(machine), "VTPU_PORT": str(free_port())}
    try:
        copied_at = time.monotonic()
        run = subprocess.run(
            ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        page.goto("/nodes/")
        mine = page.get_by_role("row").filter(has_text="(your machine)")
        expect(mine).to_contain_text("ready", timeout=120_000)  # the list refreshes itself
        enrolled_in = time.monotonic() - copied_at

        # The first node's agent is killed: an alert shows on its page.
        pid_file = stack.var_dir / "nodes" / node_id / "agent.pid"
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        killed_at = time.monotonic()
        page.goto(f"/nodes/{node_id}/")
        alerts = page.locator("section", has=page.get_by_role("heading", name="Alerts", exact=True))
        open_alert = alerts.locator("tbody tr").filter(
            has=page.get_by_role("cell", name="open", exact=True)
        )

        def alert_shown() -> bool:
            page.reload()
            return open_alert.count() > 0

        wait_for(alert_shown, 120, "an open alert on the killed node's page", interval=2)
        alert_in = time.monotonic() - killed_at
        expect(open_alert.first).to_contain_text("critical")
    finally:
        stop_agent(machine / "agent.pid")
    assert script_errors(console) == []

    # Another customer sees nothing of it, and no customer reaches the staff dashboard.
    other = new_page(browser, stack, [])
    sign_up(other, stack, "dario")
    assert other.goto(f"/nodes/{node_id}/").status == 404
    staff = other.goto("/staff/")
    assert staff.status == 403 or other.url.startswith(f"{stack.url}/accounts/login/"), other.url
    print(
        f"\nportal: sign-up to a ready node {ready_in:.1f} s (the log grew {len(seen) - 1} times"
        f" without a reload), copied command to an enrolled machine {enrolled_in:.1f} s,"
        f" killed agent to alert {alert_in:.1f} s"
    )


def stop_agent(pid_file: Path) -> None:
    if pid_file.exists():
        pid = int(pid_file.read_text().split()[0])
        if process_alive(pid):
            os.kill(pid, signal.SIGTERM)


# ---- the API: dunning on the real stack -------------------------------------------------------


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
