"""Dunning (docs/architecture.md, "Billing"): what happens to an account whose payment failed.

past due (a renewal's payment failed: the customer is e-mailed, nodes keep running)
  → suspended after BILLING_GRACE_DAYS (nodes refuse work, keep their data and keep
    heartbeating; suspension is not downtime)
  → deprovisioning announced BILLING_DEPROVISION_NOTICE_DAYS before it happens
  → deprovisioned after BILLING_DEPROVISION_DAYS.
A payment that leaves nothing owed (a webhook, reconciliation, or the customer's new card) puts
the account back in good standing at once and resumes its suspended nodes; their agents learn it
at their next heartbeat.

The sweep (dunning_sweep) runs every minute; each step is a conditional UPDATE, so a step is
taken (and its mail sent) once even when two sweeps overlap.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from accounts.models import Membership
from billing.models import BillingCustomer, Invoice, Subscription
from fleet.models import Node, NodeAction, NodeState
from fleet.services import nodes as fleet_nodes
from fleet.services.transitions import try_transition

log = logging.getLogger(__name__)
S = NodeState
Standing = BillingCustomer.Standing
# The cause of a suspension says "suspended" (monitoring.uptime counts it as not downtime).
SUSPEND_CAUSE = "suspended for non-payment: invoice {invoice} unpaid since {since:%Y-%m-%d}"
RESUME_CAUSE = "resumed: the account's payment came in"


def _tell(account_id: int, subject: str, body: str) -> None:
    """Mail the account's owners (members when it has none); a mail that cannot be sent is
    logged, never a reason to undo what was done."""
    members = Membership.objects.filter(account_id=account_id).select_related("user")
    owners = [m.user.email for m in members if m.role == Membership.Role.OWNER and m.user.email]
    recipients = owners or [m.user.email for m in members if m.user.email]
    if not recipients:
        log.warning("account %s has no e-mail address for %r", account_id, subject)
        return
    try:
        send_mail(f"[vTPU Cloud] {subject}", body, None, recipients)
    except Exception:  # SMTP down: the state change stands; staff see the log
        log.exception("mail %r to account %s failed", subject, account_id)


def _dates(since: datetime) -> dict[str, datetime]:
    return {
        "suspend_at": since + timedelta(days=settings.BILLING_GRACE_DAYS),
        "deprovision_at": since + timedelta(days=settings.BILLING_DEPROVISION_DAYS),
    }


def payment_failed(*, account_id: int, invoice_id: str) -> bool:
    """A renewal's payment failed: the account is past due from now (once; a second failure of
    the same debt changes nothing) and its owners are told what happens when."""
    now = timezone.now()
    BillingCustomer.objects.get_or_create(account_id=account_id)
    moved = BillingCustomer.objects.filter(account_id=account_id, standing=Standing.GOOD).update(
        standing=Standing.PAST_DUE, past_due_since=now, past_due_invoice_id=invoice_id
    )
    if not moved:
        return False
    dates = _dates(now)
    log.warning("account %s past due: invoice %s", account_id, invoice_id)
    _tell(
        account_id,
        "Your payment failed",
        f"The payment of invoice {invoice_id} failed. Save a new card at /billing/card or pay"
        f" the invoice; your nodes keep running until {dates['suspend_at']:%Y-%m-%d %H:%M} UTC,"
        f" are suspended then, and are deprovisioned on {dates['deprovision_at']:%Y-%m-%d} UTC"
        " if the invoice is still unpaid.",
    )
    return True


def payment_recovered_if_settled(*, account_id: int) -> bool:
    """A payment came in: if the account owes nothing more (no open invoice of a live
    subscription), it is in good standing again and its suspended nodes resume."""
    customer = BillingCustomer.objects.filter(account_id=account_id).first()
    if customer is None or customer.standing in (Standing.GOOD, Standing.DEPROVISIONED):
        return False
    owed = Invoice.objects.filter(account_id=account_id, status="open").exclude(
        subscription__status__in=Subscription.ENDED
    )
    if owed.exists():
        return False
    with transaction.atomic():
        moved = BillingCustomer.objects.filter(
            pk=customer.pk, standing__in=[Standing.PAST_DUE, Standing.SUSPENDED]
        ).update(
            standing=Standing.GOOD,
            past_due_since=None,
            past_due_invoice_id="",
            suspended_at=None,
            deprovision_announced_at=None,
        )
        if not moved:
            return False
        resumed = 0
        for node in Node.objects.filter(account_id=account_id, state=S.SUSPENDED):
            if fleet_nodes.suspended_by_account(node):
                continue  # the account paused it itself: it stays paused
            if try_transition(node, S.READY, RESUME_CAUSE):
                fleet_nodes.node_action_request(node=node, kind=NodeAction.Kind.RESUME)
                resumed += 1
    log.info("account %s paid: good standing, %s node(s) resumed", account_id, resumed)
    _tell(account_id, "Payment received", f"Thank you: {resumed} suspended node(s) resumed.")
    return True


def _suspend(customer: BillingCustomer, now: datetime) -> int:
    cause = SUSPEND_CAUSE.format(
        invoice=customer.past_due_invoice_id or "?", since=customer.past_due_since
    )
    suspended = 0
    with transaction.atomic():
        if not BillingCustomer.objects.filter(pk=customer.pk, standing=Standing.PAST_DUE).update(
            standing=Standing.SUSPENDED, suspended_at=now
        ):
            return 0
        for node in Node.objects.filter(
            account_id=customer.account_id, state__in=[S.READY, S.DEGRADED]
        ):
            if try_transition(node, S.SUSPENDED, cause):
                fleet_nodes.node_action_request(node=node, kind=NodeAction.Kind.SUSPEND)
                suspended += 1
    dates = _dates(customer.past_due_since)
    _tell(
        customer.account_id,
        "Your nodes are suspended",
        f"Invoice {customer.past_due_invoice_id} is unpaid since"
        f" {customer.past_due_since:%Y-%m-%d}: {suspended} node(s) are suspended (they keep your"
        " data and resume within a minute of your payment). Unpaid, they are deprovisioned on"
        f" {dates['deprovision_at']:%Y-%m-%d} UTC.",
    )
    return suspended


def _announce(customer: BillingCustomer, now: datetime) -> bool:
    if not BillingCustomer.objects.filter(
        pk=customer.pk, standing=Standing.SUSPENDED, deprovision_announced_at__isnull=True
    ).update(deprovision_announced_at=now):
        return False
    when = _dates(customer.past_due_since)["deprovision_at"]
    _tell(
        customer.account_id,
        "Your nodes will be deprovisioned",
        f"Invoice {customer.past_due_invoice_id} is still unpaid. On {when:%Y-%m-%d %H:%M} UTC"
        " your suspended nodes will be deprovisioned and their data deleted. Pay the invoice"
        " before then to keep them.",
    )
    return True


def _deprovision(customer: BillingCustomer, now: datetime) -> int:
    if not BillingCustomer.objects.filter(pk=customer.pk, standing=Standing.SUSPENDED).update(
        standing=Standing.DEPROVISIONED, deprovisioned_at=now
    ):
        return 0
    cause = f"deprovisioned for non-payment: invoice {customer.past_due_invoice_id} unpaid"
    count = fleet_nodes.nodes_deprovision(
        nodes=Node.objects.filter(account_id=customer.account_id), cause=cause
    )
    _tell(
        customer.account_id,
        "Your nodes were deprovisioned",
        f"Invoice {customer.past_due_invoice_id} stayed unpaid for"
        f" {settings.BILLING_DEPROVISION_DAYS} days: {count} node(s) were deprovisioned.",
    )
    return count


def dunning_sweep(*, now: datetime) -> dict[str, int]:
    """Take every due step: suspend after the grace period, announce, deprovision."""
    counts = {"suspended": 0, "announced": 0, "deprovisioned": 0}
    grace = timedelta(days=settings.BILLING_GRACE_DAYS)
    end = timedelta(days=settings.BILLING_DEPROVISION_DAYS)
    notice = timedelta(days=settings.BILLING_DEPROVISION_NOTICE_DAYS)
    for customer in BillingCustomer.objects.filter(
        standing=Standing.PAST_DUE, past_due_since__lte=now - grace
    ):
        counts["suspended"] += _suspend(customer, now)
    for customer in BillingCustomer.objects.filter(
        standing=Standing.SUSPENDED,
        deprovision_announced_at__isnull=True,
        past_due_since__lte=now - (end - notice),
    ):
        counts["announced"] += int(_announce(customer, now))
    # Never without the full notice: an announcement made late delays the deprovisioning.
    for customer in BillingCustomer.objects.filter(
        standing=Standing.SUSPENDED,
        past_due_since__lte=now - end,
        deprovision_announced_at__lte=now - notice,
    ):
        counts["deprovisioned"] += _deprovision(customer, now)
    return counts
