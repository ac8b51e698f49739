"""Writes of billing (docs/architecture.md, "Billing"): plans mirrored to Stripe, an account's
Stripe customer, and the Stripe webhook pipeline: store the request, verify it, keep each event
id once, process it once in a task, retry a failed processing until it succeeds.

Every Stripe call goes through billing.stripe_client. Tasks are sent by name
(fleet.services.queue) after the transaction that needs them commits.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.models import Account, Membership
from billing.errors import BadInput, BillingError, NotFound, StripeUnavailable
from billing.events import NO_HANDLER, handler_for
from billing.models import BillingCustomer, Plan, StripeEvent
from billing.stripe_client import is_missing, stripe_client
from fleet.services import queue

log = logging.getLogger(__name__)

PROCESS_EVENT_TASK = "billing.tasks.process_stripe_event"
DEFAULT_PLAN = {"name": "vTPU node", "amount_cents": 20000, "currency": "usd"}
# A verified event's own task normally runs within seconds; the sweep sends it again after this.
FIRST_ATTEMPT_GRACE = timedelta(seconds=60)
RETRY_BACKOFF_SECONDS = 30  # after the first failure; doubles per attempt...
RETRY_BACKOFF_MAX_SECONDS = 3600  # ...up to an hour, for ever: an event is never given up
REJECTED_RETENTION = timedelta(days=30)  # refused requests are kept this long for staff
MAX_SIGNATURE_CHARS = 2000
SWEEP_BATCH = 500
State = StripeEvent.State


# ---- plans ------------------------------------------------------------------------------------


def _is_true(value: object) -> bool:
    # localstripe stores some modified fields as strings ("false"); Stripe answers booleans.
    return str(value).lower() == "true"


@transaction.atomic
def plan_sync(*, plan: Plan) -> Plan:
    """Mirror `plan` to Stripe: its Product (name) and its Stripe Plan. Stripe Plans cannot
    change price, so a plan whose amount, currency or interval differs from its Stripe Plan's
    (re-read from Stripe) gets a new Stripe Plan and the old one is deactivated there (existing
    subscriptions keep it until they are moved)."""
    client = stripe_client()
    plan = Plan.objects.select_for_update().get(pk=plan.pk)
    metadata = {"vtpu_plan_id": str(plan.pk), "node_kind": plan.node_kind}
    if plan.stripe_product_id:
        try:
            client.v1.products.update(
                plan.stripe_product_id, params={"name": plan.name, "metadata": metadata}
            )
        except stripe.StripeError as exc:
            if not is_missing(exc):
                raise
            plan.stripe_product_id = ""  # deleted in Stripe: make it again
    if not plan.stripe_product_id:
        product = client.v1.products.create(params={"name": plan.name, "metadata": metadata})
        plan.stripe_product_id = product.id

    current = None
    if plan.stripe_plan_id:
        try:
            current = client.v1.plans.retrieve(plan.stripe_plan_id)
        except stripe.StripeError as exc:
            if not is_missing(exc):
                raise
    wanted = (plan.amount_cents, plan.currency, plan.interval, plan.stripe_product_id)
    if (
        current is None
        or (int(current["amount"]), current["currency"], current["interval"], current["product"])
        != wanted
    ):
        created = client.v1.plans.create(
            params={
                "product": plan.stripe_product_id,
                "amount": plan.amount_cents,
                "currency": plan.currency,
                "interval": plan.interval,
                "nickname": plan.name,
                "active": plan.active,
                "metadata": metadata,
            }
        )
        if current is not None and _is_true(current["active"]):
            client.v1.plans.update(current.id, params={"active": False})
        log.info("plan %s: Stripe Plan %s replaces %s", plan.pk, created.id, plan.stripe_plan_id)
        plan.stripe_plan_id = created.id
    elif _is_true(current["active"]) != plan.active:
        client.v1.plans.update(current.id, params={"active": plan.active})
    plan.synced_at = timezone.now()
    plan.save(update_fields=["stripe_product_id", "stripe_plan_id", "synced_at"])
    return plan


def plan_default_ensure() -> Plan:
    """The default plan ("vTPU node", $200/month per provisioned node), made once."""
    plan, _ = Plan.objects.get_or_create(name=DEFAULT_PLAN["name"], defaults=DEFAULT_PLAN)
    return plan


# ---- customers ----------------------------------------------------------------------------


@transaction.atomic
def customer_ensure(*, account: Account) -> BillingCustomer:
    """The account's Stripe customer, created the first time billing needs it. The account's
    row is locked, so two calls at once make one customer."""
    account = Account.objects.select_for_update().get(pk=account.pk)
    customer, _ = BillingCustomer.objects.get_or_create(account=account)
    if customer.stripe_customer_id:
        return customer
    owner = (
        Membership.objects.filter(account=account, role=Membership.Role.OWNER)
        .select_related("user")
        .order_by("created")
        .first()
    )
    # Idempotent at Stripe too: a retry after our commit failed gets the same customer back.
    generation = int(customer.unlinked_at.timestamp()) if customer.unlinked_at else 0
    params = {"name": account.name, "metadata": {"vtpu_account_id": str(account.pk)}}
    if owner is not None and owner.user.email:
        params["email"] = owner.user.email
    created = stripe_client().v1.customers.create(
        params=params, options={"idempotency_key": f"vtpu-customer-{customer.pk}-{generation}"}
    )
    customer.stripe_customer_id = created.id
    customer.linked_at = timezone.now()
    customer.save(update_fields=["stripe_customer_id", "linked_at"])
    log.info("account %s: Stripe customer %s created", account.pk, created.id)
    return customer


@transaction.atomic
def customer_link_from_stripe(*, stripe_customer_id: str) -> str:
    """Link a Stripe customer to the account its metadata names, or unlink it when Stripe says
    it is deleted — from the customer's current state in Stripe, not an event's snapshot."""
    try:
        current = stripe_client().v1.customers.retrieve(stripe_customer_id).to_dict()
    except stripe.StripeError as exc:
        if not is_missing(exc):
            raise
        current = {"deleted": True}
    if current.get("deleted"):
        unlinked = BillingCustomer.objects.filter(stripe_customer_id=stripe_customer_id).update(
            stripe_customer_id=None, unlinked_at=timezone.now()
        )
        if unlinked:
            return f"{stripe_customer_id} is deleted in Stripe: unlinked from its account"
        return f"{stripe_customer_id} is deleted in Stripe and was not linked"
    raw_account_id = (current.get("metadata") or {}).get("vtpu_account_id", "")
    try:
        account_id = int(raw_account_id)
    except (TypeError, ValueError):
        return f"{stripe_customer_id} names no account of ours (metadata vtpu_account_id)"
    account = Account.objects.select_for_update().filter(pk=account_id).first()
    if account is None:
        return f"{stripe_customer_id} names account {account_id}, which does not exist"
    elsewhere = BillingCustomer.objects.filter(stripe_customer_id=stripe_customer_id).first()
    if elsewhere is not None and elsewhere.account_id != account.pk:
        return (
            f"{stripe_customer_id} names account {account.pk} but is linked to account"
            f" {elsewhere.account_id}: not changed"
        )
    customer, _ = BillingCustomer.objects.get_or_create(account=account)
    if customer.stripe_customer_id == stripe_customer_id:
        return f"{stripe_customer_id} is linked to account {account.pk}"
    if customer.stripe_customer_id:
        return (
            f"{stripe_customer_id} names account {account.pk}, which is linked to"
            f" {customer.stripe_customer_id}: not changed"
        )
    customer.stripe_customer_id = stripe_customer_id
    customer.linked_at = timezone.now()
    customer.save(update_fields=["stripe_customer_id", "linked_at"])
    return f"{stripe_customer_id} linked to account {account.pk}"


# ---- the card ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupIntent:
    id: str
    client_secret: str


def setup_intent_create(*, account: Account) -> SetupIntent:
    """A SetupIntent for the account's Stripe customer: the browser confirms the card with it
    (Stripe.js), so the card number goes from the browser to Stripe and never through us."""
    customer = customer_ensure(account=account)
    intent = stripe_client().v1.setup_intents.create(
        params={
            "customer": customer.stripe_customer_id,
            "payment_method_types": ["card"],
            "usage": "off_session",
            "metadata": {"vtpu_account_id": str(account.pk)},
        }
    )
    return SetupIntent(id=intent.id, client_secret=intent.client_secret)


def _card_fields(payment_method) -> dict:
    card = payment_method["card"]
    return {
        "payment_method_id": payment_method.id,
        "card_brand": str(card["brand"] or "")[:30],
        "card_last4": str(card["last4"] or "")[:4],
        "card_exp": f"{int(card['exp_month']):02d}/{int(card['exp_year'])}",
    }


def payment_method_save(*, account: Account, setup_intent_id: str) -> BillingCustomer:
    """Make the card of a confirmed SetupIntent the account's default, read back from Stripe
    (never from the browser's word): it must have succeeded and belong to this account's
    customer. Money the account owes is then collected with it at once."""
    if not isinstance(setup_intent_id, str) or not setup_intent_id.startswith("seti_"):
        raise BadInput("Give the id of a confirmed SetupIntent (seti_...).", field="setup_intent")
    customer = customer_ensure(account=account)
    client = stripe_client()
    try:
        intent = client.v1.setup_intents.retrieve(setup_intent_id).to_dict()
    except stripe.StripeError as exc:
        if is_missing(exc):
            raise NotFound("No such SetupIntent in your account.", field="setup_intent") from None
        raise StripeUnavailable(f"Stripe did not answer: {exc.user_message or exc}") from exc
    if intent.get("customer") != customer.stripe_customer_id:
        raise NotFound("No such SetupIntent in your account.", field="setup_intent")
    if intent.get("status") != "succeeded" or not intent.get("payment_method"):
        error = (intent.get("last_setup_error") or {}).get("message")
        reason = error or f"it is {intent.get('status')}, not succeeded"
        raise BillingError(f"The card was not saved: {reason}.", field="setup_intent")
    method_id = intent["payment_method"]
    if not isinstance(method_id, str):
        method_id = method_id["id"]
    method = client.v1.payment_methods.retrieve(method_id)
    if not method["customer"]:
        # The local Stripe server does not attach a confirmed SetupIntent's card (Stripe does).
        method = client.v1.payment_methods.attach(
            method_id, params={"customer": customer.stripe_customer_id}
        )
    client.v1.customers.update(
        customer.stripe_customer_id,
        params={"invoice_settings": {"default_payment_method": method_id}},
    )
    fields = _card_fields(method)
    BillingCustomer.objects.filter(pk=customer.pk).update(**fields)
    customer.refresh_from_db()
    log.info("account %s: card %s saved", account.pk, fields["card_last4"])
    from billing import subscriptions  # the card pays what is owed (a cycle: it imports us)

    subscriptions.invoices_pay_open(account=account)
    return customer


# ---- webhook events ------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookReply:
    status: int
    detail: str
    event: StripeEvent | None = None


def _storable(body: bytes) -> str:
    # Verification uses the bytes as received; the stored copy must be text PostgreSQL accepts.
    # A verified body is valid UTF-8 JSON, which cannot hold a raw NUL: it is stored exactly.
    return body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _reject(event: StripeEvent, status: int, reason: str) -> WebhookReply:
    StripeEvent.objects.filter(pk=event.pk).update(state=State.REJECTED, last_error=reason)
    event.state, event.last_error = State.REJECTED, reason
    log.warning("Stripe webhook request %s rejected: %s", event.pk, reason)
    return WebhookReply(status, reason, event)


def webhook_receive(*, body: bytes, signature: str) -> WebhookReply:
    """One request to the webhook. The request is stored first (committed on its own), then its
    signature and timestamp are verified; a verified event takes its Stripe id (unique) and is
    queued for processing. A second delivery of an event, even a concurrent one, loses the race
    for the id and is acknowledged without being processed again."""
    event = StripeEvent.objects.create(
        body=_storable(body), signature=signature[:MAX_SIGNATURE_CHARS]
    )
    secret = settings.STRIPE_WEBHOOK_SECRET
    if not secret:  # Stripe delivers again later: nothing is lost while this is fixed
        return _reject(event, 503, "Webhooks are off: STRIPE_WEBHOOK_SECRET is not set.")
    if not signature:
        return _reject(event, 400, "No Stripe-Signature header.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _reject(event, 400, "The body is not UTF-8 text; Stripe sends JSON.")
    try:
        stripe.Webhook.construct_event(
            text, signature, secret, tolerance=settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS
        )
        payload = json.loads(text)
    except stripe.SignatureVerificationError as exc:
        return _reject(event, 400, f"Signature refused: {exc.user_message or exc}.")
    except ValueError as exc:  # signed with our secret, yet not JSON
        return _reject(event, 400, f"The body is not a JSON event: {exc}.")
    if not isinstance(payload, dict):
        return _reject(event, 400, "The body is not a Stripe event (not a JSON object).")
    stripe_id, event_type = payload.get("id"), payload.get("type")
    if not (isinstance(stripe_id, str) and stripe_id and isinstance(event_type, str)):
        return _reject(event, 400, "The body is not a Stripe event (no id or type).")
    if not isinstance(payload.get("data"), dict) or not isinstance(
        payload["data"].get("object"), dict
    ):
        return _reject(event, 400, f"Event {stripe_id} has no data.object.")
    try:
        with transaction.atomic():
            StripeEvent.objects.filter(pk=event.pk).update(
                stripe_id=stripe_id,
                type=event_type[:255],
                state=State.PENDING,
                next_attempt_at=timezone.now() + FIRST_ATTEMPT_GRACE,
            )
    except IntegrityError:
        # Another delivery of this event holds its id: it is stored and processed there.
        event.delete()
        known = StripeEvent.objects.filter(stripe_id=stripe_id).first()
        log.info("Stripe event %s delivered again: acknowledged, not processed again", stripe_id)
        return WebhookReply(200, f"Event {stripe_id} was already received.", known)
    event.refresh_from_db()
    _queue_processing(event.pk)
    return WebhookReply(200, f"Event {stripe_id} received.", event)


def _queue_processing(event_pk: int) -> None:
    transaction.on_commit(lambda: queue.send_task(PROCESS_EVENT_TASK, event_pk))


def retry_delay(attempts: int) -> timedelta:
    """Wait before the next attempt after `attempts` attempts (30 s, 60 s, ... at most 1 h)."""
    seconds = RETRY_BACKOFF_SECONDS * 2 ** max(attempts - 1, 0)
    return timedelta(seconds=min(seconds, RETRY_BACKOFF_MAX_SECONDS))


def event_process(*, event_pk: int) -> str:
    """Process one verified event once: the row is locked and claimed inside one transaction
    with its handler's writes. A handler that raises rolls its writes back; the failure is
    recorded (attempts, last_error, next_attempt_at) and the retry sweep sends it again."""
    with transaction.atomic():
        event = StripeEvent.objects.select_for_update().filter(pk=event_pk).first()
        if event is None:
            return "no such event"
        if event.state not in (State.PENDING, State.FAILED):
            return f"not processed: the event is {event.state}"
        event.attempts += 1
        handler = handler_for(event.type)
        try:
            with transaction.atomic():
                outcome = handler(json.loads(event.body)) if handler else NO_HANDLER
        except Exception as exc:  # any handler failure is recorded and retried, never lost
            event.state = State.FAILED
            event.last_error = f"{type(exc).__name__}: {exc}"[:4000]
            event.next_attempt_at = timezone.now() + retry_delay(event.attempts)
            event.save(update_fields=["state", "attempts", "last_error", "next_attempt_at"])
            log.warning("Stripe event %s (%s) failed: %s", event.stripe_id, event.type, exc)
            return "failed"
        event.state = State.PROCESSED
        event.processed_at = timezone.now()
        event.next_attempt_at = None
        event.outcome = outcome[:4000]
        event.save(
            update_fields=["state", "attempts", "processed_at", "next_attempt_at", "outcome"]
        )
        return outcome


def events_retry_due(*, now: datetime) -> int:
    """The sweep: send again every event whose processing failed and is due, or whose first task
    never ran (a broker outage); each is pushed to its next slot first, so a slow worker does
    not get it twice from the next sweep. Also drops refused requests past their retention."""
    StripeEvent.objects.filter(
        state=State.REJECTED, received_at__lt=now - REJECTED_RETENTION
    ).delete()
    due = StripeEvent.objects.filter(
        state__in=[State.PENDING, State.FAILED], next_attempt_at__lte=now
    ).order_by("next_attempt_at")
    sent = 0
    for pk, attempts in due.values_list("pk", "attempts")[:SWEEP_BATCH]:
        claimed = StripeEvent.objects.filter(
            pk=pk, state__in=[State.PENDING, State.FAILED], next_attempt_at__lte=now
        ).update(next_attempt_at=now + retry_delay(attempts + 1))
        if claimed and queue.send_task(PROCESS_EVENT_TASK, pk):
            sent += 1
    return sent


@transaction.atomic
def events_process_again(*, events: QuerySet[StripeEvent]) -> int:
    """Staff's "process again": verified events (processed or not) are queued once more; their
    handlers re-read Stripe, so a second run repairs rather than repeats. Refused requests have
    no verified event to process."""
    pks = list(events.exclude(stripe_id=None).values_list("pk", flat=True))
    StripeEvent.objects.filter(pk__in=pks).update(
        state=State.PENDING, next_attempt_at=timezone.now() + FIRST_ATTEMPT_GRACE
    )
    for pk in pks:
        _queue_processing(pk)
    return len(pks)
