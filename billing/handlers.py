"""Stripe event handlers of this slice (registry: billing.events). Customers are linked to or
unlinked from their account after re-reading them from Stripe; products and plans are only
logged (our plans are the source of truth for those: billing.services.plan_sync)."""

from __future__ import annotations

import logging

from billing import services
from billing.events import handles

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
