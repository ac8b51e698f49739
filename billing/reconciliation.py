"""Reconciliation (docs/architecture.md, "Billing"): webhooks can be missed entirely (and the
local Stripe server never sends some), so every few minutes Stripe's subscriptions and invoices
are read back and acted on exactly as their events would have been; what cannot be repaired
(money and nodes disagree) is reported to staff as a ReconciliationIssue, kept open until a
later run no longer finds it.

Stripe is the source of truth for money (a subscription's status, an invoice paid or not); our
nodes are the source of truth for what should be billed. A quantity that differs is synced once
(our nodes changed and the task that follows them was lost); if it still differs, it is reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

import stripe
from django.db.models import Q
from django.utils import timezone

from billing import dunning, subscriptions
from billing.models import (
    BillingCustomer,
    Invoice,
    NodeCharge,
    Plan,
    ReconciliationIssue,
    Subscription,
)
from billing.stripe_client import stripe_client
from fleet.models import Node

log = logging.getLogger(__name__)
Kind = ReconciliationIssue.Kind
PAYING = ("active", "past_due", "trialing")
RECENT_INVOICES = 20  # per customer and run: older ones were settled by earlier runs


@dataclass
class Report:
    repaired: list[str] = field(default_factory=list)
    issues: list[tuple[str, str, str]] = field(default_factory=list)  # kind, key, detail

    def as_dict(self) -> dict:
        return {
            "repaired": self.repaired,
            "issues": [{"kind": k, "key": key, "detail": d} for k, key, d in self.issues],
        }


def _read_back(report: Report) -> None:
    """Every customer's subscriptions and recent invoices, as their events would have."""
    client = stripe_client()
    for customer in BillingCustomer.objects.exclude(stripe_customer_id=None):
        try:
            subs = client.v1.subscriptions.list(
                params={"customer": customer.stripe_customer_id, "status": "all", "limit": 100}
            )
            for sub in subs.data:
                known = Subscription.objects.filter(stripe_subscription_id=sub.id).first()
                before = known and (known.status, known.quantity)
                outcome = subscriptions.subscription_refresh(
                    stripe_subscription_id=sub.id, current=sub
                )
                known = Subscription.objects.filter(stripe_subscription_id=sub.id).first()
                if known is None and sub["status"] not in Subscription.ENDED:
                    report.issues.append(
                        (Kind.UNKNOWN_SUBSCRIPTION, sub.id, f"{outcome} (customer"
                         f" {customer.stripe_customer_id}, account {customer.account_id})")
                    )  # fmt: skip
                elif known is not None and before != (known.status, known.quantity):
                    report.repaired.append(outcome)
            invoices = client.v1.invoices.list(
                params={"customer": customer.stripe_customer_id, "limit": RECENT_INVOICES}
            )
            for invoice in invoices.data:
                mirrored = (
                    Invoice.objects.filter(stripe_invoice_id=invoice.id)
                    .values_list("status", flat=True)
                    .first()
                )
                if mirrored != invoice["status"]:
                    report.repaired.append(subscriptions.invoice_sync(invoice_id=invoice.id))
        except stripe.StripeError as exc:  # one customer's failure must not stop the others
            log.warning("reconciliation: customer %s: %s", customer.stripe_customer_id, exc)


def _waiting_charges(report: Report) -> None:
    """Orders whose payment event never came: their invoice is read again."""
    waiting = NodeCharge.objects.filter(state__in=subscriptions.WAITING).exclude(
        stripe_invoice_id=""
    )
    for invoice_id in set(waiting.values_list("stripe_invoice_id", flat=True)):
        before = set(waiting.filter(stripe_invoice_id=invoice_id).values_list("state", flat=True))
        outcome = subscriptions.invoice_sync(invoice_id=invoice_id)
        if NodeCharge.objects.filter(stripe_invoice_id=invoice_id, state="paid").exists():
            report.repaired.append(f"{outcome}: its nodes released (was {sorted(before)})")


def _mismatches(report: Report) -> None:
    """Money and nodes that disagree, compared per account and plan."""
    paid_plans = Plan.objects.filter(amount_cents__gt=0)
    billable = (
        Node.objects.filter(plan__in=paid_plans)
        .exclude(state__in=subscriptions.NOT_BILLABLE)
        .exclude(charge__state=NodeCharge.State.CANCELED)
    )
    pairs = set(billable.values_list("account_id", "plan_id"))
    live = Subscription.objects.filter(subscriptions.LIVE_SUBSCRIPTION, plan__in=paid_plans)
    pairs |= set(live.values_list("account_id", "plan_id"))
    for account_id, plan_id in sorted(pairs):
        nodes = billable.filter(account_id=account_id, plan_id=plan_id)
        count = nodes.count()
        sub = live.filter(account_id=account_id, plan_id=plan_id).first()
        if count and (sub is None or sub.status not in PAYING):
            waiting = nodes.filter(charge__state__in=subscriptions.WAITING)
            for node in nodes.exclude(pk__in=waiting):
                where = (
                    f"subscription {sub.stripe_subscription_id} is {sub.status}"
                    if sub
                    else ("no subscription")
                )
                report.issues.append(
                    (Kind.NODE_WITHOUT_SUBSCRIPTION, str(node.pk),
                     f"node {node.name} ({node.state}) of account {account_id} is on paid plan"
                     f" {plan_id} but has {where}")
                )  # fmt: skip
            continue
        if sub is None:
            continue
        if count == 0 and sub.quantity > 0:
            report.issues.append(
                (Kind.SUBSCRIPTION_WITHOUT_NODES, sub.stripe_subscription_id,
                 f"subscription {sub.stripe_subscription_id} of account {account_id} bills"
                 f" {sub.quantity} node(s) of plan {plan_id}; the account has none")
            )  # fmt: skip
        elif count != sub.quantity:
            report.issues.append(
                (Kind.QUANTITY_MISMATCH, sub.stripe_subscription_id,
                 f"subscription {sub.stripe_subscription_id} of account {account_id} bills"
                 f" {sub.quantity} node(s) of plan {plan_id}; the account has {count}")
            )  # fmt: skip


def _repair_quantities() -> list[str]:
    """A quantity that differs from our nodes (while there are some) is synced once: the task
    that follows the nodes was lost. What this does not settle is reported."""
    repaired = []
    paid = Subscription.objects.filter(
        subscriptions.LIVE_SUBSCRIPTION, plan__amount_cents__gt=0, status__in=PAYING
    ).select_related("account", "plan")
    for sub in paid:
        want = subscriptions.billable_count(account=sub.account, plan=sub.plan)
        # None left: reported, not cancelled here (it may be one staff made by hand).
        if want and want != sub.quantity:
            try:
                subscriptions.subscription_sync(account=sub.account, plan=sub.plan)
                repaired.append(f"{sub.stripe_subscription_id}: quantity {sub.quantity} -> {want}")
            except stripe.StripeError as exc:
                log.warning("reconciliation: %s not synced: %s", sub.stripe_subscription_id, exc)
    return repaired


def _record(report: Report, now: datetime) -> None:
    seen = Q(pk__in=[])
    for kind, key, detail in report.issues:
        account_id = None
        if kind == Kind.NODE_WITHOUT_SUBSCRIPTION:
            account_id = Node.objects.filter(pk=key).values_list("account_id", flat=True).first()
        else:
            account_id = (
                Subscription.objects.filter(stripe_subscription_id=key)
                .values_list("account_id", flat=True)
                .first()
            )
        issue, created = ReconciliationIssue.objects.get_or_create(
            kind=kind,
            key=key,
            resolved_at=None,
            defaults={"detail": detail, "last_seen": now, "account_id": account_id},
        )
        if not created:
            ReconciliationIssue.objects.filter(pk=issue.pk).update(detail=detail, last_seen=now)
        else:
            log.warning("reconciliation: %s", detail)
        seen |= Q(pk=issue.pk)
    ReconciliationIssue.objects.filter(resolved_at=None).exclude(seen).update(resolved_at=now)


def reconcile(*, now: datetime | None = None) -> Report:
    """One run: read Stripe back, act on it, expire unpaid orders, end subscriptions whose
    cancellation is due, report what still disagrees."""
    now = now or timezone.now()
    report = Report()
    if not subscriptions.billing_enabled():
        return report
    _read_back(report)
    _waiting_charges(report)
    expired = subscriptions.unpaid_orders_expire(now=now)
    if expired:
        report.repaired.append(f"{expired} unpaid order(s) removed")
    ended = subscriptions.subscriptions_period_ended(now=now)
    if ended:
        report.repaired.append(f"{ended} cancelled subscription(s) ended at period end")
    report.repaired += _repair_quantities()
    for customer in BillingCustomer.objects.exclude(standing=BillingCustomer.Standing.GOOD):
        if dunning.payment_recovered_if_settled(account_id=customer.account_id):
            report.repaired.append(f"account {customer.account_id}: paid, back in good standing")
    _mismatches(report)
    _record(report, now)
    return report
