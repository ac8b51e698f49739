"""Stripe event handlers (registry: billing.events). Each re-reads its object from Stripe and
acts on its current state, so late, repeated and out-of-order events do the right thing.
Customers are linked to or unlinked from their account; invoices, payments and subscriptions
go through billing.subscriptions; products and plans are only logged (our plans are the source
of truth for those: billing.services.plan_sync)."""

from __future__ import annotations

import logging

from billing import services, subscriptions
from billing.events import handles
from billing.models import BillingCustomer
from billing.stripe_client import stripe_client

log = logging.getLogger(__name__)


@handles("customer.created", "customer.updated", "customer.deleted")
def customer_changed(event: dict) -> str:
    return services.customer_link_from_stripe(stripe_customer_id=event["data"]["object"]["id"])


@handles(
    "product.created",
    "product.updated",
    "product.deleted",
    "plan.created",
    "plan.updated",
    "plan.deleted",
)
def catalogue_changed(event: dict) -> str:
    obj = event["data"]["object"]
    log.info("Stripe %s: %s", event["type"], obj.get("id"))
    return f"logged {event['type']} of {obj.get('id')}"


@handles("invoice.paid", "invoice.payment_succeeded", "invoice.payment_failed", "invoice.created")
@handles("invoice.updated", "invoice.finalized", "invoice.voided")
def invoice_changed(event: dict) -> str:
    # invoice.paid and invoice.payment_succeeded alike: both re-read the invoice and act on it.
    return subscriptions.invoice_sync(invoice_id=event["data"]["object"]["id"])


@handles(
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)
def subscription_changed(event: dict) -> str:
    return subscriptions.subscription_refresh(stripe_subscription_id=event["data"]["object"]["id"])


@handles("payment_intent.succeeded", "payment_intent.payment_failed")
def payment_changed(event: dict) -> str:
    """A payment's outcome matters through the invoice it pays (3-D Secure confirmed in the
    browser, or a card declined): that invoice is re-read."""
    intent = event["data"]["object"]
    current = stripe_client().v1.payment_intents.retrieve(intent["id"])
    invoice_id = current["invoice"]
    if not invoice_id:
        return f"payment {intent['id']} ({current['status']}) pays no invoice"
    return subscriptions.invoice_sync(invoice_id=subscriptions.stripe_id(invoice_id))


@handles("setup_intent.succeeded")
def setup_intent_succeeded(event: dict) -> str:
    """A card confirmed in the browser whose page never told us (closed too early): it
    becomes the account's card as if the page had."""
    intent = stripe_client().v1.setup_intents.retrieve(event["data"]["object"]["id"])
    customer = BillingCustomer.objects.filter(stripe_customer_id=intent["customer"]).first()
    if customer is None:
        return f"setup intent {intent.id} is not one of our customers'"
    services.payment_method_save(account=customer.account, setup_intent_id=intent.id)
    return f"setup intent {intent.id}: card saved for account {customer.account_id}"
