"""SLA credits become money (docs/architecture.md, "Billing"): each monitoring.SlaCredit turns
into one negative invoice item on the account's next invoice, its amount the credit's share of
the node's monthly fee. The SlaCreditApplied row is written in the same transaction as the
Stripe call, which carries an idempotency key of the credit: a repeated or concurrent run never
credits twice, and a run that failed halfway is repeated safely."""

from __future__ import annotations

import logging

import stripe
from django.db import IntegrityError, transaction

from billing.models import BillingCustomer, Plan, SlaCreditApplied, Subscription
from billing.services import plan_default_ensure
from billing.stripe_client import stripe_client
from monitoring.models import SlaCredit

log = logging.getLogger(__name__)


def credit_amount_cents(credit: SlaCredit, plan: Plan) -> int:
    """What the credit is worth: its percentage of the node's monthly fee, rounded down to a
    cent (the customer is never credited more than the share)."""
    return -(plan.amount_cents * credit.credit_percent // 100)


def _apply(credit: SlaCredit) -> str:
    plan = credit.node.plan or plan_default_ensure()
    amount = credit_amount_cents(credit, plan)
    customer = BillingCustomer.objects.filter(account_id=credit.account_id).first()
    stripe_customer = customer.stripe_customer_id if customer else None
    with transaction.atomic():
        try:
            with transaction.atomic():
                applied = SlaCreditApplied.objects.create(
                    credit=credit, amount_cents=amount, currency=plan.currency
                )
        except IntegrityError:
            return "already applied"
        if amount == 0 or not stripe_customer:
            # Nothing to pay back (a free plan, or an account that never paid): recorded as such.
            return "recorded: nothing was billed"
        params = {
            "customer": stripe_customer,
            "amount": amount,
            "currency": plan.currency,
            "description": (
                f"SLA credit: node {credit.node.name}, {credit.month:%Y-%m} uptime"
                f" {credit.uptime_ratio:.4%} below {credit.sla_target:.3%}"
                f" ({credit.credit_percent} % of {plan.amount_cents / 100:.2f})"
            ),
            "metadata": {"vtpu_sla_credit_id": str(credit.pk)},
        }
        sub = (
            Subscription.objects.filter(account_id=credit.account_id, plan=plan)
            .exclude(status__in=Subscription.ENDED)
            .first()
        )
        if sub is not None:
            params["subscription"] = sub.stripe_subscription_id
        item = stripe_client().v1.invoice_items.create(
            params=params, options={"idempotency_key": f"vtpu-sla-credit-{credit.pk}"}
        )
        SlaCreditApplied.objects.filter(pk=applied.pk).update(stripe_invoice_item_id=item.id)
    log.info("SLA credit %s: %s cents on %s", credit.pk, amount, item.id)
    return f"credited {amount} cents"


def sla_credits_apply() -> dict[str, int]:
    """Every SLA credit not applied yet; a Stripe failure leaves it for the next run."""
    counts = {"applied": 0, "failed": 0}
    pending = SlaCredit.objects.filter(applied__isnull=True).select_related("node__plan")
    for credit in pending.order_by("pk"):
        try:
            if _apply(credit) != "already applied":
                counts["applied"] += 1
        except stripe.StripeError as exc:
            counts["failed"] += 1
            log.warning("SLA credit %s not applied yet: %s", credit.pk, exc)
    return counts
