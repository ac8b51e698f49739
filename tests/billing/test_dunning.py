"""Dunning, SLA credits and reconciliation against a real local Stripe server: a failed renewal
makes the account past due (Stripe's real signed webhook says so), its nodes are suspended after
the grace period without counting as downtime, a payment resumes them at once; unpaid, they are
announced and deprovisioned. An SLA breach becomes one negative invoice item. Reconciliation
repairs a missed webhook and reports what it cannot repair."""

import time
from datetime import timedelta

import pytest
import requests
from django.urls import reverse
from django.utils import timezone

from billing import credits, dunning, reconciliation
from billing.models import (
    BillingCustomer,
    NodeCharge,
    ReconciliationIssue,
    SlaCreditApplied,
    Subscription,
)
from fleet.models import Node, NodeAction
from tests.billing.conftest import make_ready, order, set_default_card
from tests.concurrency import at_once
from tests.conftest import give_card
from tests.platform.conftest import account, api_client_for

pytestmark = pytest.mark.django_db
WEBHOOK = "/billing/stripe/webhook"
Standing = BillingCustomer.Standing


def paid_node(customer, name="first") -> Node:
    give_card(account(customer))
    reply = order(api_client_for(customer), name)
    assert reply.status_code == 201, reply.content
    node = Node.objects.get(pk=reply.json()["id"])
    make_ready(node)
    return node


def fail_a_renewal(stripe_api, customer, localstripe) -> str:
    """A renewal whose payment fails the way the local server can fail one: a card that asks
    for 3-D Secure, is authenticated, then declines (../shared/STRIPE.md)."""
    set_default_card(account(customer), "4000008260003178")
    bc = BillingCustomer.objects.get(account=account(customer))
    sub = Subscription.objects.get(account=account(customer), ended_at=None)
    invoice = stripe_api.v1.invoices.create(
        params={"customer": bc.stripe_customer_id, "subscription": sub.stripe_subscription_id}
    )
    invoice = stripe_api.v1.invoices.pay(invoice.id, params={"expand": ["payment_intent"]})
    intent = invoice["payment_intent"]
    assert intent["status"] == "requires_action"
    reply = requests.post(
        f"{localstripe}/v1/payment_intents/{intent['id']}/_authenticate",
        data={"client_secret": intent["client_secret"], "success": "true", "key": "pk_test_x"},
        timeout=10,
    )
    assert reply.status_code == 402, reply.text  # authenticated, then declined
    return invoice.id


def wait_for(check, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.django_db(transaction=True)
def test_failed_payment_past_due_suspended_paid_resumed(
    customer, local_host, plan, stripe_api, tasks, live_server, register_webhook, localstripe,
    mailoutbox,
):  # fmt: skip
    register_webhook(live_server.url + WEBHOOK, ["invoice.payment_failed"])
    node = paid_node(customer)
    invoice_id = fail_a_renewal(stripe_api, customer, localstripe)

    # Stripe's webhook makes the account past due and the customer is told what happens when.
    bc = BillingCustomer.objects.filter(account=account(customer))
    wait_for(lambda: bc.get().standing == Standing.PAST_DUE, "invoice.payment_failed")
    assert bc.get().past_due_invoice_id == invoice_id
    (mail,) = [m for m in mailoutbox if "payment failed" in m.subject.lower()]
    assert customer.email in mail.to and "suspended" in mail.body
    since = bc.get().past_due_since
    node.refresh_from_db()
    assert node.state == "ready"  # the grace period

    # A day before the grace period ends nothing happens; after it, the node is suspended.
    assert dunning.dunning_sweep(now=since + timedelta(days=6))["suspended"] == 0
    counts = dunning.dunning_sweep(now=since + timedelta(days=7, seconds=1))
    assert counts["suspended"] == 1
    node.refresh_from_db()
    assert node.state == "suspended"
    assert NodeAction.objects.filter(node=node, kind="suspend", completed_at=None).exists()
    assert dunning.dunning_sweep(now=since + timedelta(days=7, seconds=2))["suspended"] == 0

    # Suspension is not downtime.
    from monitoring.uptime import nodes_uptime

    measured = nodes_uptime([node], node.created, timezone.now())[node.pk]
    assert measured.down_seconds == 0 and measured.excluded_seconds >= 0

    # A new card pays the invoice at once: good standing, the node resumes.
    give_card(account(customer))
    assert bc.get().standing == Standing.GOOD
    node.refresh_from_db()
    assert node.state == "ready"
    assert node.transitions.last().cause.startswith("resumed")
    assert NodeAction.objects.filter(node=node, kind="resume", completed_at=None).exists()
    assert any("Payment received" in m.subject for m in mailoutbox)


def test_unpaid_nodes_are_announced_then_deprovisioned(
    customer, local_host, plan, tasks, mailoutbox
):
    node = paid_node(customer)
    assert dunning.payment_failed(account_id=account(customer).pk, invoice_id="in_test")
    assert not dunning.payment_failed(account_id=account(customer).pk, invoice_id="in_test")
    since = BillingCustomer.objects.get(account=account(customer)).past_due_since
    dunning.dunning_sweep(now=since + timedelta(days=8))
    # Announced BILLING_DEPROVISION_NOTICE_DAYS (7) before day 30, once.
    assert dunning.dunning_sweep(now=since + timedelta(days=22))["announced"] == 0
    assert dunning.dunning_sweep(now=since + timedelta(days=23, seconds=1))["announced"] == 1
    assert dunning.dunning_sweep(now=since + timedelta(days=24))["announced"] == 0
    (notice,) = [m for m in mailoutbox if "will be deprovisioned" in m.subject]
    assert (since + timedelta(days=30)).strftime("%Y-%m-%d") in notice.body
    node.refresh_from_db()
    assert node.state == "suspended"
    counts = dunning.dunning_sweep(now=since + timedelta(days=30, seconds=1))
    assert counts["deprovisioned"] == 1
    node.refresh_from_db()
    assert node.state == "deprovisioning"
    assert "non-payment" in node.transitions.last().cause
    assert BillingCustomer.objects.get(account=account(customer)).standing == "deprovisioned"


def test_an_announcement_made_late_still_gives_the_full_notice(customer, local_host, plan, tasks):
    node = paid_node(customer)
    dunning.payment_failed(account_id=account(customer).pk, invoice_id="in_test")
    since = BillingCustomer.objects.get(account=account(customer)).past_due_since
    dunning.dunning_sweep(now=since + timedelta(days=8))
    late = since + timedelta(days=31)  # the sweep did not run for weeks
    assert dunning.dunning_sweep(now=late) == {"suspended": 0, "announced": 1, "deprovisioned": 0}
    assert dunning.dunning_sweep(now=late + timedelta(days=6))["deprovisioned"] == 0
    assert dunning.dunning_sweep(now=late + timedelta(days=7, seconds=1))["deprovisioned"] == 1
    node.refresh_from_db()
    assert node.state == "deprovisioning"


# ---- SLA credits ------------------------------------------------------------------------------


def sla_credit(node, percent=10):
    from monitoring.models import SlaCredit

    return SlaCredit.objects.create(
        node=node,
        account=node.account,
        month=timezone.now().date().replace(day=1),
        uptime_ratio=0.9964,
        sla_target=0.999,
        down_seconds=9600,
        credit_percent=percent,
    )


def test_an_sla_breach_becomes_one_credit_on_the_next_invoice(
    customer, local_host, plan, stripe_api, tasks
):
    node = paid_node(customer)
    credit = sla_credit(node)
    assert credits.sla_credits_apply() == {"applied": 1, "failed": 0}
    assert credits.sla_credits_apply() == {"applied": 0, "failed": 0}
    applied = SlaCreditApplied.objects.get(credit=credit)
    assert applied.amount_cents == -2000  # 10 % of 200.00
    bc = BillingCustomer.objects.get(account=account(customer))
    items = stripe_api.v1.invoice_items.list(params={"customer": bc.stripe_customer_id}).data
    ours = [
        i
        for i in items
        if (i.to_dict().get("metadata") or {}).get("vtpu_sla_credit_id") == str(credit.pk)
    ]
    assert [(i.id, int(i["amount"])) for i in ours] == [(applied.stripe_invoice_item_id, -2000)]

    # The next invoice (a renewal) carries it.
    sub = Subscription.objects.get(account=account(customer), ended_at=None)
    invoice = stripe_api.v1.invoices.create(
        params={"customer": bc.stripe_customer_id, "subscription": sub.stripe_subscription_id}
    )
    lines = stripe_api.v1.invoices.line_items.list(invoice.id).data
    assert -2000 in [int(line["amount"]) for line in lines]


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_credit_once(customer, local_host, plan, stripe_api, tasks):
    node = paid_node(customer)
    credit = sla_credit(node, percent=25)
    results, errors = at_once(credits.sla_credits_apply, 3)
    assert not errors, errors
    assert sum(r["applied"] for r in results) == 1
    bc = BillingCustomer.objects.get(account=account(customer))
    items = stripe_api.v1.invoice_items.list(params={"customer": bc.stripe_customer_id}).data
    ours = [
        i
        for i in items
        if (i.to_dict().get("metadata") or {}).get("vtpu_sla_credit_id") == str(credit.pk)
    ]
    assert [int(i["amount"]) for i in ours] == [-5000]


# ---- reconciliation ---------------------------------------------------------------------------


def test_a_webhook_that_never_arrives_is_repaired_by_reconciliation(
    customer, local_host, plan, tasks, localstripe
):
    give_card(account(customer))
    set_default_card(account(customer), "4000002500003155")
    body = order(api_client_for(customer), "first").json()
    assert body["payment"]["state"] == "requires_action"
    intent_id = body["client_secret"].split("_secret_")[0]
    requests.post(
        f"{localstripe}/v1/payment_intents/{intent_id}/_authenticate",
        data={"client_secret": body["client_secret"], "success": "true", "key": "pk_test_x"},
        timeout=10,
    ).raise_for_status()
    node = Node.objects.get(pk=body["id"])
    assert not node.jobs.exists()  # no webhook is registered here: nothing came
    report = reconciliation.reconcile()
    assert node.jobs.exists()
    node.charge.refresh_from_db()
    assert node.charge.state == NodeCharge.State.PAID
    assert any("released" in line or "paid" in line for line in report.repaired), report


def test_reconciliation_reports_a_node_without_subscription_and_a_subscription_without_node(
    customer, local_host, plan, stripe_api, tasks
):
    from billing.services import customer_ensure
    from fleet.services.nodes import node_request

    # A node on the paid plan that billing never saw (made while billing was off).
    stray = node_request(
        account=account(customer), user=customer, name="stray", plan_id=plan.pk
    ).node
    # A subscription of this account's, made by hand in Stripe, with no node behind it.
    give_card(account(customer))
    other = customer_ensure(account=account(customer))
    orphan = stripe_api.v1.subscriptions.create(
        params={
            "customer": other.stripe_customer_id,
            "items": [{"plan": plan.stripe_plan_id, "quantity": 1}],
        }
    )
    report = reconciliation.reconcile()
    kinds = {(kind, key) for kind, key, _ in report.issues}
    assert ("node_without_subscription", str(stray.pk)) in kinds
    assert ("unknown_subscription", orphan.id) in kinds
    open_issues = ReconciliationIssue.objects.filter(resolved_at=None)
    assert set(open_issues.values_list("kind", "key")) >= {
        ("node_without_subscription", str(stray.pk)),
        ("unknown_subscription", orphan.id),
    }

    # Staff see them through the API; customers may not.
    from tests.platform.conftest import make_customer

    staff = api_client_for(make_customer("staffer", staff=True))
    listed = staff.get(reverse("billing-reconciliation")).json()["results"]
    assert {(i["kind"], i["key"]) for i in listed} >= {("unknown_subscription", orphan.id)}
    assert api_client_for(customer).get(reverse("billing-reconciliation")).status_code == 403

    # A second run keeps one open issue each; fixing it resolves it.
    reconciliation.reconcile()
    assert open_issues.filter(key=str(stray.pk)).count() == 1
    stripe_api.v1.subscriptions.cancel(orphan.id)
    reconciliation.reconcile()
    assert not open_issues.filter(key=orphan.id).exists()


def test_reconciliation_reports_a_subscription_of_ours_without_nodes(
    customer, local_host, plan, stripe_api, tasks
):
    from billing.services import customer_ensure

    give_card(account(customer))
    bc = customer_ensure(account=account(customer))
    sub = stripe_api.v1.subscriptions.create(
        params={
            "customer": bc.stripe_customer_id,
            "items": [{"plan": plan.stripe_plan_id, "quantity": 2}],
            "metadata": {"vtpu_account_id": str(bc.account_id), "vtpu_plan_id": str(plan.pk)},
        }
    )
    report = reconciliation.reconcile()
    assert Subscription.objects.filter(stripe_subscription_id=sub.id).exists()  # adopted
    assert ("subscription_without_nodes", sub.id) in {(k, key) for k, key, _ in report.issues}
    # Reported, not cancelled behind staff's back.
    assert stripe_api.v1.subscriptions.retrieve(sub.id)["status"] == "active"


def test_reconciliation_repairs_a_quantity_whose_sync_was_lost(
    customer, local_host, plan, stripe_api, tasks
):
    node = paid_node(customer)
    sub = Subscription.objects.get(account=account(customer), ended_at=None)
    current = stripe_api.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    item = current["items"]["data"][0]
    stripe_api.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"items": [{"id": item.id, "quantity": 3}]}
    )
    report = reconciliation.reconcile()
    assert int(stripe_api.v1.subscriptions.retrieve(sub.stripe_subscription_id)["quantity"]) == 1
    assert any("quantity 3 -> 1" in line for line in report.repaired), report
    assert not ReconciliationIssue.objects.filter(resolved_at=None, account=node.account).exists()
