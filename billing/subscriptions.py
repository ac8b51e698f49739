"""Money and nodes kept in agreement (docs/architecture.md, "Billing"): an account has one
Stripe subscription per plan it uses, whose quantity is its billable nodes on that plan; a node
ordered on a paid plan is provisioned only once the invoice charging for it is paid.

- node_order: the node is made (held), the subscription grows, the invoice that charges for the
  new node is paid at once with the default card; paid → provisioning starts, 3-D Secure → the
  customer confirms in the browser and the webhook (or reconciliation) releases it, declined →
  nothing is provisioned and the customer is told why.
- subscription_sync: the quantity in Stripe follows our nodes (a node that goes shrinks it; the
  last node cancels it).
- invoice_sync / subscription_refresh: Stripe's current state of an invoice or subscription,
  re-read (never an event's snapshot), mirrored, and acted on: charges paid, dunning begun or
  ended, nodes of a subscription that ended after a cancellation deprovisioned.

Stripe calls are made while the account's row is locked, so two changes to one account's
subscriptions never interleave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import stripe
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Account, User
from billing import dunning
from billing.errors import BillingError, NotFound, PaymentRequired, StripeUnavailable
from billing.models import BillingCustomer, Invoice, NodeCharge, Plan, Subscription
from billing.services import customer_ensure, plan_sync
from billing.stripe_client import is_missing, stripe_client, stripe_configured
from fleet.models import Host, Node, NodeState
from fleet.services import nodes as fleet_nodes
from fleet.services import queue

log = logging.getLogger(__name__)
S = NodeState
Charge = NodeCharge.State
SYNC_TASK = "billing.tasks.sync_subscription"
# A node counts in its plan's quantity from its order until it starts going away.
NOT_BILLABLE = (S.DEPROVISIONING, S.TERMINATED)
LIVE_SUBSCRIPTION = ~Q(status__in=Subscription.ENDED)
WAITING = (Charge.AWAITING_PAYMENT, Charge.REQUIRES_ACTION, Charge.DECLINED)


def billing_enabled() -> bool:
    return stripe_configured()


def _when(timestamp) -> datetime | None:
    return datetime.fromtimestamp(int(timestamp), tz=UTC) if timestamp else None


def stripe_id(value) -> str:
    """An expandable Stripe field: an id, or the object it names."""
    if not value:
        return ""
    return value if isinstance(value, str) else value["id"]


# ---- plans a node can be ordered on ----------------------------------------------------------


def plan_for_order(*, plan_id: int | None, node_kind: str) -> Plan | None:
    """The plan a new node of `node_kind` is billed by: the one asked for (active, of that
    kind), else the cheapest active plan of that kind; None when there is none (enrolled nodes
    are free until staff add a plan for them)."""
    plans = Plan.objects.filter(active=True, node_kind=node_kind)
    if plan_id is not None:
        plan = plans.filter(pk=plan_id).first()
        if plan is None:
            raise NotFound(
                f"Plan {plan_id} is not an active plan for {node_kind} nodes; see"
                " GET /api/v1/billing/plans.",
                field="plan",
            )
        return plan
    return plans.order_by("amount_cents", "pk").first()


def _is_paid(plan: Plan | None) -> bool:
    return plan is not None and plan.amount_cents > 0 and billing_enabled()


def order_check(*, account: Account, plan: Plan | None) -> None:
    """Refuse an order the account cannot pay for, before anything is made: no card, money
    owed, or a cancellation under way. Free plans (or billing off) pass."""
    if not _is_paid(plan):
        return
    customer = BillingCustomer.objects.filter(account=account).first()
    if customer is not None and customer.cancel_requested_at is not None:
        raise BillingError(
            "Your account is being cancelled at the end of the billing period; resume it"
            " (DELETE /api/v1/billing/cancel) before adding nodes."
        )
    if customer is not None and customer.standing != BillingCustomer.Standing.GOOD:
        raise PaymentRequired(
            "A payment of your account failed: pay the open invoice (or save a new card) before"
            " adding nodes."
        )
    if customer is None or not customer.payment_method_id:
        raise PaymentRequired(
            f"Add a card first: the {plan.name} plan costs"
            f" {plan.amount_cents / 100:.2f} {plan.currency.upper()} per node per"
            f" {plan.interval}. Save one at /billing/card."
        )


# ---- ordering a node -------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    node: Node
    charge: NodeCharge | None  # None: no plan at all (billing has nothing to say)
    client_secret: str = ""  # of the invoice's payment, when the bank wants 3-D Secure


@transaction.atomic
def _make_held(
    *, account: Account, user: User, name: str, host: Host | None, plan: Plan | None, hold: bool
) -> tuple[Node, NodeCharge | None]:
    requested = fleet_nodes.node_request(
        account=account,
        user=user,
        name=name,
        host=host,
        plan_id=plan.pk if plan else None,
        hold=hold,
    )
    charge = None
    if plan is not None:
        charge = NodeCharge.objects.create(
            node=requested.node,
            plan=plan,
            state=Charge.AWAITING_PAYMENT if hold else Charge.FREE,
            message="Waiting for the invoice for this node to be paid." if hold else "",
        )
    return requested.node, charge


def node_order(
    *, account: Account, user: User, name: str, host: Host | None = None, plan_id: int | None
) -> Order:
    """Request a node on a plan. Free (or billing off): provisioned at once. Paid: the node is
    held in `requested` while its invoice is paid; the Order says how the payment went."""
    plan = plan_for_order(plan_id=plan_id, node_kind=Plan.NodeKind.PROVISIONED)
    order_check(account=account, plan=plan)
    paid = _is_paid(plan)
    node, charge = _make_held(
        account=account, user=user, name=name, host=host, plan=plan, hold=paid
    )
    if not paid:
        return Order(node=node, charge=charge)
    try:
        invoice = subscription_sync(account=account, plan=plan)
    except stripe.StripeError as exc:
        # Nothing was charged for it: the node goes, and the quantity follows (signal).
        fleet_nodes.node_deprovision_request(
            node=node, cause=f"its order could not be billed: {exc.user_message or exc}"
        )
        NodeCharge.objects.filter(pk=charge.pk).update(
            state=Charge.CANCELED, message="Stripe could not be reached; nothing was charged."
        )
        raise StripeUnavailable(
            f"The payment could not be made ({exc.user_message or exc}); nothing was charged"
            " and the node was not created. Try again in a minute."
        ) from exc
    if invoice is None:  # the quantity already counted it (a retried order): find its invoice
        invoice = _latest_open_or_paid_invoice(account=account, plan=plan)
    if invoice is not None:
        NodeCharge.objects.filter(pk=charge.pk).update(stripe_invoice_id=invoice.id)
        invoice_apply(invoice)
    charge.refresh_from_db()
    node.refresh_from_db()
    secret = ""
    if charge.state == Charge.REQUIRES_ACTION and invoice is not None:
        secret = _payment_intent_secret(invoice)
    return Order(node=node, charge=charge, client_secret=secret)


def _payment_intent_secret(invoice) -> str:
    intent = invoice.to_dict().get("payment_intent")
    if isinstance(intent, str):
        intent = stripe_client().v1.payment_intents.retrieve(intent).to_dict()
    return (intent or {}).get("client_secret") or ""


def _latest_open_or_paid_invoice(*, account: Account, plan: Plan):
    sub = Subscription.objects.filter(LIVE_SUBSCRIPTION, account=account, plan=plan).first()
    if sub is None:
        return None
    invoices = stripe_client().v1.invoices.list(
        params={"subscription": sub.stripe_subscription_id, "limit": 1}
    )
    return invoices.data[0] if invoices.data else None


def enrolled_node_bill(*, node: Node) -> None:
    """An enrolled node is billed by the cheapest active plan for enrolled nodes, if staff made
    one; the subscription grows in a task (the machine is the customer's: it runs meanwhile, and
    a failed payment of its invoice is dunned like a renewal's)."""
    plan = plan_for_order(plan_id=None, node_kind=Plan.NodeKind.ENROLLED)
    if plan is None:
        return
    Node.objects.filter(pk=node.pk).update(plan=plan)
    # No charge to wait for: the node is already running, and an invoice that fails is dunned.
    if _is_paid(plan):
        subscription_sync_later(account_id=node.account_id, plan_id=plan.pk)


# ---- the subscription follows the nodes ------------------------------------------------------


def billable_count(*, account: Account, plan: Plan) -> int:
    return (
        Node.objects.filter(account=account, plan=plan)
        .exclude(state__in=NOT_BILLABLE)
        .exclude(charge__state=Charge.CANCELED)
        .count()
    )


def subscription_sync_later(*, account_id: int, plan_id: int) -> None:
    transaction.on_commit(lambda: queue.send_task(SYNC_TASK, account_id, plan_id))


def subscription_sync(*, account: Account, plan: Plan):
    """Make the account's subscription for `plan` bill its billable nodes: created with the first
    one, its quantity set to their count, cancelled with the last. A growth is invoiced and paid
    at once (the new nodes wait for that invoice); returns that invoice (with its payment
    intent), or None when nothing was charged."""
    if not billing_enabled() or plan.amount_cents == 0:
        return None
    with transaction.atomic():
        account = Account.objects.select_for_update().get(pk=account.pk)
        want = billable_count(account=account, plan=plan)
        sub = Subscription.objects.filter(LIVE_SUBSCRIPTION, account=account, plan=plan).first()
        client = stripe_client()
        current = None
        if sub is not None:
            try:
                current = client.v1.subscriptions.retrieve(sub.stripe_subscription_id)
            except stripe.StripeError as exc:
                if not is_missing(exc):
                    raise
            if current is None or current["status"] in Subscription.ENDED:
                _mirror_subscription(sub, current)
                sub, current = None, None
        if sub is None:
            return _subscription_create(account, plan, want) if want else None
        have = int(current["quantity"] or 0)
        if want == 0:
            ended = client.v1.subscriptions.cancel(sub.stripe_subscription_id)
            _mirror_subscription(sub, ended)
            log.info("account %s: %s cancelled (no nodes left)", account.pk, sub)
            return None
        if want == have:
            _mirror_subscription(sub, current)
            return None
        item = current["items"]["data"][0]
        updated = client.v1.subscriptions.update(
            sub.stripe_subscription_id, params={"items": [{"id": item.id, "quantity": want}]}
        )
        _mirror_subscription(sub, updated)
        log.info("account %s: %s quantity %s -> %s", account.pk, sub, have, want)
        if want < have:
            return None
        # The added nodes are charged now: an invoice of the pending proration, paid at once.
        customer = customer_ensure(account=account)
        invoice = client.v1.invoices.create(
            params={
                "customer": customer.stripe_customer_id,
                "subscription": sub.stripe_subscription_id,
            }
        )
        return _pay(invoice.id)


def _subscription_create(account: Account, plan: Plan, quantity: int):
    if not plan.stripe_plan_id:
        plan = plan_sync(plan=plan)
    customer = customer_ensure(account=account)
    created = stripe_client().v1.subscriptions.create(
        params={
            "customer": customer.stripe_customer_id,
            "items": [{"plan": plan.stripe_plan_id, "quantity": quantity}],
            "metadata": {"vtpu_account_id": str(account.pk), "vtpu_plan_id": str(plan.pk)},
            "expand": ["latest_invoice.payment_intent"],
        }
    )
    sub = Subscription(
        account=account, plan=plan, stripe_subscription_id=created.id, status=created["status"]
    )
    _mirror_subscription(sub, created)
    log.info("account %s: %s created", account.pk, sub)
    return created["latest_invoice"]


def _pay(invoice_id: str):
    """Pay an open invoice with the customer's default card; the invoice as it is afterwards
    (paid, or open with its payment intent saying why not)."""
    client = stripe_client()
    try:
        return client.v1.invoices.pay(invoice_id, params={"expand": ["payment_intent"]})
    except stripe.StripeError as exc:  # declined, or the bank wants authentication
        log.info("invoice %s not paid: %s", invoice_id, exc.user_message or exc)
        return client.v1.invoices.retrieve(invoice_id, params={"expand": ["payment_intent"]})


def _mirror_subscription(sub: Subscription, current) -> Subscription:
    """Store Stripe's current state of a subscription (None: deleted in Stripe)."""
    if current is None:
        sub.status = "canceled"
        sub.ended_at = sub.ended_at or timezone.now()
    else:
        sub.status = str(current["status"])
        sub.quantity = int(current["quantity"] or 0)
        sub.current_period_start = _when(current["current_period_start"])
        sub.current_period_end = _when(current["current_period_end"])
        sub.cancel_at_period_end = str(current["cancel_at_period_end"]).lower() == "true"
        sub.ended_at = _when(current["ended_at"]) or (
            timezone.now() if sub.status in Subscription.ENDED else None
        )
    sub.synced_at = timezone.now()
    sub.save()
    return sub


# ---- invoices --------------------------------------------------------------------------------


def invoice_apply(invoice) -> Invoice | None:
    """Act on an invoice's current state (a Stripe object, freshly read): mirror it; paid →
    the nodes waiting for it are provisioned and, once nothing is owed, a past-due account is
    in good standing again; payment failed → the nodes waiting for it stay unprovisioned with
    the reason, or (a renewal) the account becomes past due."""
    data = invoice.to_dict()  # plain dicts: the local server leaves out some optional fields
    customer = BillingCustomer.objects.filter(
        stripe_customer_id=stripe_id(data.get("customer"))
    ).first()
    if customer is None:
        log.info("invoice %s is not one of our customers'", data["id"])
        return None
    intent = data.get("payment_intent")
    if isinstance(intent, str):
        intent = stripe_client().v1.payment_intents.retrieve(intent).to_dict()
    intent = intent or {}
    error = (intent.get("last_payment_error") or {}).get("message") or ""
    sub = Subscription.objects.filter(
        stripe_subscription_id=stripe_id(data.get("subscription"))
    ).first()
    status = str(data.get("status") or "")
    with transaction.atomic():
        mirrored, _ = Invoice.objects.update_or_create(
            stripe_invoice_id=data["id"],
            defaults={
                "account_id": customer.account_id,
                "subscription": sub,
                "status": status,
                "currency": data.get("currency") or "",
                "total_cents": int(data.get("total") or 0),
                "amount_due_cents": int(data.get("amount_due") or 0),
                "amount_paid_cents": int(data.get("amount_paid") or 0),
                "period_start": _when(data.get("period_start")),
                "period_end": _when(data.get("period_end")),
                "stripe_created": _when(data.get("created")) or timezone.now(),
                "payment_intent_id": intent.get("id") or "",
                "payment_status": str(intent.get("status") or ""),
                "payment_error": str(error),
                "hosted_invoice_url": str(data.get("hosted_invoice_url") or "")[:500],
            },
        )
        if status == "paid":
            Invoice.objects.filter(pk=mirrored.pk, paid_at__isnull=True).update(
                paid_at=timezone.now()
            )
            _charges_paid(data["id"])
        elif status == "open":
            _charges_waiting(data["id"], intent.get("status"), error)
    if status == "paid":
        dunning.payment_recovered_if_settled(account_id=customer.account_id)
    elif status == "open" and intent.get("status") == "requires_payment_method":
        if not NodeCharge.objects.filter(stripe_invoice_id=data["id"]).exists():
            dunning.payment_failed(account_id=customer.account_id, invoice_id=data["id"])
    return mirrored


def _charges_paid(invoice_id: str) -> None:
    for charge in NodeCharge.objects.filter(stripe_invoice_id=invoice_id, state__in=WAITING):
        NodeCharge.objects.filter(pk=charge.pk).update(
            state=Charge.PAID, paid_at=timezone.now(), message=""
        )
        job = fleet_nodes.node_provision_release(node=charge.node)
        log.info("node %s paid (invoice %s): job %s", charge.node_id, invoice_id, job and job.pk)


def _charges_waiting(invoice_id: str, intent_status: str | None, error: str) -> None:
    state, message = Charge.AWAITING_PAYMENT, "Waiting for the invoice for this node to be paid."
    if intent_status in ("requires_action", "requires_confirmation"):
        state = Charge.REQUIRES_ACTION
        message = "Your bank asks you to confirm this payment (3-D Secure)."
    elif error:
        state = Charge.DECLINED
        message = (
            f"{error} Nothing was provisioned: save another card, then pay the invoice"
            " (POST /api/v1/billing/invoices/<id>/pay) or delete the node."
        )
    NodeCharge.objects.filter(stripe_invoice_id=invoice_id, state__in=WAITING).update(
        state=state, message=message
    )


def invoice_sync(*, invoice_id: str) -> str:
    """Re-read an invoice from Stripe and act on it (webhooks, reconciliation)."""
    try:
        invoice = stripe_client().v1.invoices.retrieve(
            invoice_id, params={"expand": ["payment_intent"]}
        )
    except stripe.StripeError as exc:
        if is_missing(exc):
            return f"invoice {invoice_id} does not exist in Stripe"
        raise
    mirrored = invoice_apply(invoice)
    if mirrored is None:
        return f"invoice {invoice_id} is not one of our customers'"
    return f"invoice {invoice_id} is {mirrored.status} ({mirrored.payment_status or 'no payment'})"


def invoice_pay(*, account: Account, invoice: Invoice) -> Invoice:
    """The customer pays an open invoice with their default card (after saving a new one)."""
    if invoice.status != "open":
        raise BillingError(f"Invoice {invoice.stripe_invoice_id} is {invoice.status}, not open.")
    customer = BillingCustomer.objects.filter(account=account).first()
    if customer is None or not customer.payment_method_id:
        raise PaymentRequired("Save a card first (/billing/card).")
    mirrored = invoice_apply(_pay(invoice.stripe_invoice_id))
    if mirrored.status != "paid":
        raise PaymentRequired(
            mirrored.payment_error
            or f"The invoice is still {mirrored.status}: {mirrored.payment_status}."
        )
    return mirrored


def invoices_pay_open(*, account: Account) -> int:
    """Try the default card on every open invoice of the account (a new card was saved)."""
    paid = 0
    for invoice in Invoice.objects.filter(account=account, status="open"):
        try:
            invoice_pay(account=account, invoice=invoice)
            paid += 1
        except BillingError as exc:
            log.info("invoice %s still open: %s", invoice.stripe_invoice_id, exc.message)
    return paid


# ---- subscriptions: Stripe's word, and cancellation -----------------------------------------


def subscription_refresh(*, stripe_subscription_id: str, current=None) -> str:
    """Re-read a subscription from Stripe (unless the caller just read it: `current`) and mirror
    it. A subscription that ended after the account asked to cancel takes its nodes with it
    (that is what cancelling means); one that ended otherwise is left to reconciliation to
    report (money and nodes disagree)."""
    sub = Subscription.objects.filter(stripe_subscription_id=stripe_subscription_id).first()
    if current is None:
        try:
            current = stripe_client().v1.subscriptions.retrieve(stripe_subscription_id)
        except stripe.StripeError as exc:
            if not is_missing(exc):
                raise
    if sub is None:
        sub = _adopt(current)
        if sub is None:
            return f"subscription {stripe_subscription_id} is not one of ours"
    _mirror_subscription(sub, current)
    if sub.status in Subscription.ENDED:
        ended = cancellation_complete(subscription=sub)
        return f"subscription {stripe_subscription_id} ended; {ended} node(s) deprovisioned"
    return f"subscription {stripe_subscription_id} is {sub.status} ({sub.quantity} nodes)"


def _adopt(current) -> Subscription | None:
    """A subscription of ours we have no row for (our commit failed after Stripe made it)."""
    if current is None:
        return None
    metadata = current["metadata"] or {}
    try:
        account_id, plan_id = int(metadata["vtpu_account_id"]), int(metadata["vtpu_plan_id"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (
        Account.objects.filter(pk=account_id).exists() and Plan.objects.filter(pk=plan_id).exists()
    ):
        return None
    return Subscription(
        account_id=account_id, plan_id=plan_id, stripe_subscription_id=current.id, status=""
    )


def cancellation_complete(*, subscription: Subscription) -> int:
    """The subscription ended: if the account had asked to cancel, its nodes on that plan are
    deprovisioned now (the end of the period they paid for)."""
    customer = BillingCustomer.objects.filter(account_id=subscription.account_id).first()
    if customer is None or customer.cancel_requested_at is None:
        return 0
    return fleet_nodes.nodes_deprovision(
        nodes=Node.objects.filter(account_id=subscription.account_id, plan_id=subscription.plan_id),
        cause="the account was cancelled and its billing period ended",
    )


def account_cancel(*, account: Account, user: User) -> BillingCustomer:
    """The account stops paying at the end of the current period: every subscription is set to
    cancel then, new nodes are refused, and the nodes are deprovisioned when it ends."""
    customer = customer_ensure(account=account)
    client = stripe_client()
    for sub in Subscription.objects.filter(LIVE_SUBSCRIPTION, account=account):
        _mirror_subscription(
            sub,
            client.v1.subscriptions.update(
                sub.stripe_subscription_id, params={"cancel_at_period_end": True}
            ),
        )
    BillingCustomer.objects.filter(pk=customer.pk, cancel_requested_at__isnull=True).update(
        cancel_requested_at=timezone.now()
    )
    log.info("account %s: cancelled by %s at period end", account.pk, user.get_username())
    customer.refresh_from_db()
    return customer


def account_cancel_undo(*, account: Account) -> BillingCustomer:
    """Keep the account after all (before its period ended)."""
    customer = customer_ensure(account=account)
    if customer.cancel_requested_at is None:
        raise BillingError("Your account is not being cancelled.")
    client = stripe_client()
    for sub in Subscription.objects.filter(LIVE_SUBSCRIPTION, account=account):
        _mirror_subscription(
            sub,
            client.v1.subscriptions.update(
                sub.stripe_subscription_id, params={"cancel_at_period_end": False}
            ),
        )
    BillingCustomer.objects.filter(pk=customer.pk).update(cancel_requested_at=None)
    customer.refresh_from_db()
    return customer


def subscriptions_period_ended(*, now: datetime) -> int:
    """Subscriptions set to cancel whose period is over but whose end Stripe never reported
    (the local server has no clock): cancelled in Stripe now, and their nodes go."""
    ended = 0
    due = Subscription.objects.filter(
        LIVE_SUBSCRIPTION, cancel_at_period_end=True, current_period_end__lte=now
    )
    for sub in due:
        try:
            stripe_client().v1.subscriptions.cancel(sub.stripe_subscription_id)
        except stripe.StripeError as exc:
            if not is_missing(exc):
                raise
        subscription_refresh(stripe_subscription_id=sub.stripe_subscription_id)
        ended += 1
    return ended


# ---- a node went: its charge, and the quantity -----------------------------------------------


def node_gone(*, node: Node) -> None:
    """A node started going away (fleet.signals.node_moved): a charge not paid yet is cancelled
    and its plan's quantity is synced once this commits."""
    NodeCharge.objects.filter(node=node, state__in=WAITING).update(
        state=Charge.CANCELED, message="The node was removed before it was paid for."
    )
    if node.plan_id is not None and billing_enabled():
        subscription_sync_later(account_id=node.account_id, plan_id=node.plan_id)


def unpaid_orders_expire(*, now: datetime) -> int:
    """Nodes ordered but never paid for (a declined card, a 3-D Secure never confirmed) go after
    BILLING_UNPAID_ORDER_HOURS: nothing was provisioned, nothing stays billed."""
    cutoff = now - timedelta(hours=settings.BILLING_UNPAID_ORDER_HOURS)
    expired = NodeCharge.objects.filter(
        state__in=WAITING, created__lt=cutoff, node__state=S.REQUESTED
    )
    count = 0
    for charge in expired.select_related("node"):
        fleet_nodes.node_deprovision_request(
            node=charge.node,
            cause=f"not paid for within {settings.BILLING_UNPAID_ORDER_HOURS} hours of its order",
        )
        count += 1
    return count
