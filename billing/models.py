"""What billing keeps: the plans we sell (mirrored to Stripe), one Stripe customer per account,
and every Stripe event as it was received (docs/architecture.md, "Billing").

Stripe is the source of truth for money; these rows say which Stripe object is ours. Amounts are
integers in the currency's smallest unit (cents), as Stripe counts them.
"""

from django.core.validators import MaxValueValidator
from django.db import models


class Plan(models.Model):
    """A price per node per month. Stripe Plans are immutable: a changed price is a new Stripe
    Plan (billing.services.plan_sync), the old one is deactivated there."""

    class Interval(models.TextChoices):
        MONTH = "month"

    class NodeKind(models.TextChoices):
        # The kinds of fleet.models.Node: what kind of node this plan bills.
        PROVISIONED = "provisioned", "provisioned (our hosts)"
        ENROLLED = "enrolled", "enrolled (the customer's own machine)"

    name = models.CharField(max_length=100, unique=True)
    amount_cents = models.PositiveIntegerField(help_text="Price per node per interval, in cents.")
    currency = models.CharField(max_length=3, default="usd", help_text="ISO 4217, lower case.")
    interval = models.CharField(max_length=10, choices=Interval.choices, default=Interval.MONTH)
    node_kind = models.CharField(
        max_length=12, choices=NodeKind.choices, default=NodeKind.PROVISIONED
    )
    sla_target = models.FloatField(
        default=0.999, help_text="Monthly uptime promised per node: more than 0, at most 1."
    )
    sla_credit_percent = models.PositiveSmallIntegerField(
        default=10,
        validators=[MaxValueValidator(100)],
        help_text="Share of the node's monthly fee credited once per SLA breach.",
    )
    active = models.BooleanField(default=True, help_text="Offered to new nodes.")
    stripe_product_id = models.CharField(max_length=255, blank=True, editable=False)
    stripe_plan_id = models.CharField(
        max_length=255, blank=True, editable=False, help_text="The Stripe Plan of this price."
    )
    synced_at = models.DateTimeField(null=True, blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(sla_target__gt=0, sla_target__lte=1), name="plan_sla_target"
            ),
            models.CheckConstraint(
                condition=models.Q(sla_credit_percent__lte=100), name="plan_sla_credit_percent"
            ),
        ]

    def __str__(self) -> str:
        return (
            f"{self.name} ({self.amount_cents / 100:.2f} {self.currency.upper()}/{self.interval})"
        )


class BillingCustomer(models.Model):
    """An account's Stripe customer, created when billing is first needed
    (billing.services.customer_ensure). An empty stripe_customer_id means unlinked: the Stripe
    customer was deleted, and the next customer_ensure makes a new one."""

    account = models.OneToOneField(
        "accounts.Account", on_delete=models.PROTECT, related_name="billing_customer"
    )
    stripe_customer_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    created = models.DateTimeField(auto_now_add=True)
    linked_at = models.DateTimeField(null=True, blank=True)
    unlinked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["account"]

    def __str__(self) -> str:
        return f"{self.account}: {self.stripe_customer_id or 'no Stripe customer'}"


class StripeEvent(models.Model):
    """One request to the webhook, stored before anything else is done with it; once its
    signature is verified, one Stripe event (its id is unique: a second delivery is
    acknowledged and dropped). Processing claims the row, so an event is handled once."""

    class State(models.TextChoices):
        RECEIVED = "received"  # stored, not yet verified
        REJECTED = "rejected"  # signature, timestamp or body refused: last_error says why
        PENDING = "pending"  # verified, waiting for its task
        FAILED = "failed"  # a processing attempt failed; retried at next_attempt_at
        PROCESSED = "processed"

    stripe_id = models.CharField(
        max_length=255, null=True, blank=True, unique=True, help_text="Set once verified."
    )
    type = models.CharField(max_length=255, blank=True, db_index=True)
    body = models.TextField(help_text="The request body as received.")
    signature = models.TextField(blank=True, help_text="The Stripe-Signature header as received.")
    state = models.CharField(max_length=10, choices=State.choices, default=State.RECEIVED)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    outcome = models.TextField(blank=True, help_text="What processing did.")

    class Meta:
        ordering = ["-received_at", "-id"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(state__in=["pending", "failed"]),
                name="stripeevent_due",
            )
        ]

    def __str__(self) -> str:
        return f"{self.stripe_id or f'request {self.pk}'} {self.type} ({self.state})"
