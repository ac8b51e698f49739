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
    customer was deleted, and the next customer_ensure makes a new one.

    Also the account's standing as a payer: its card (brand and last digits only), dunning and
    cancellation (billing.dunning)."""

    class Standing(models.TextChoices):
        GOOD = "good"  # nothing owed
        PAST_DUE = "past_due"  # a payment failed: nodes run until the grace period ends
        SUSPENDED = "suspended"  # unpaid past the grace period: nodes suspended
        DEPROVISIONED = "deprovisioned"  # unpaid past the second period: nodes taken down

    account = models.OneToOneField(
        "accounts.Account", on_delete=models.PROTECT, related_name="billing_customer"
    )
    stripe_customer_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    payment_method_id = models.CharField(
        max_length=255, blank=True, help_text="The default card (its number never reaches us)."
    )
    card_brand = models.CharField(max_length=30, blank=True)
    card_last4 = models.CharField(max_length=4, blank=True)
    card_exp = models.CharField(max_length=7, blank=True, help_text="MM/YYYY")
    standing = models.CharField(max_length=16, choices=Standing.choices, default=Standing.GOOD)
    past_due_since = models.DateTimeField(null=True, blank=True)
    past_due_invoice_id = models.CharField(max_length=255, blank=True)
    suspended_at = models.DateTimeField(null=True, blank=True)
    deprovision_announced_at = models.DateTimeField(null=True, blank=True)
    deprovisioned_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="The account asked to cancel: nodes go at period end."
    )
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


class Subscription(models.Model):
    """An account's Stripe subscription for one plan; its quantity is the account's billable
    nodes on that plan. Mirrors Stripe's state (re-read on every event and by reconciliation)."""

    account = models.ForeignKey(
        "accounts.Account", on_delete=models.PROTECT, related_name="subscriptions"
    )
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    stripe_subscription_id = models.CharField(max_length=255, unique=True)
    status = models.CharField(max_length=30, help_text="Stripe's status, as last read.")
    quantity = models.PositiveIntegerField(default=0, help_text="As last read from Stripe.")
    current_period_start = models.DateTimeField(null=True, blank=True)
    current_period_end = models.DateTimeField(null=True, blank=True)
    cancel_at_period_end = models.BooleanField(default=False)
    ended_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    synced_at = models.DateTimeField(null=True, blank=True)

    ENDED = ("canceled", "incomplete_expired")

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "plan"],
                condition=~models.Q(status__in=["canceled", "incomplete_expired"]),
                name="subscription_one_live_per_plan",
            )
        ]

    def __str__(self) -> str:
        return f"{self.stripe_subscription_id} ({self.status}, {self.quantity} × {self.plan})"


class Invoice(models.Model):
    """A Stripe invoice of one of our customers, mirrored for the API and the economics."""

    account = models.ForeignKey("accounts.Account", on_delete=models.PROTECT, related_name="+")
    subscription = models.ForeignKey(
        Subscription, on_delete=models.SET_NULL, null=True, blank=True, related_name="invoices"
    )
    stripe_invoice_id = models.CharField(max_length=255, unique=True)
    status = models.CharField(max_length=20, help_text="draft, open, paid, void, uncollectible")
    currency = models.CharField(max_length=3)
    total_cents = models.IntegerField()
    amount_due_cents = models.IntegerField()
    amount_paid_cents = models.IntegerField()
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True)
    stripe_created = models.DateTimeField()
    paid_at = models.DateTimeField(null=True, blank=True)
    payment_intent_id = models.CharField(max_length=255, blank=True)
    payment_status = models.CharField(max_length=30, blank=True)
    payment_error = models.TextField(blank=True)
    hosted_invoice_url = models.URLField(max_length=500, blank=True)
    synced_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-stripe_created", "-id"]
        indexes = [models.Index(fields=["account", "-stripe_created"], name="invoice_account")]

    def __str__(self) -> str:
        return f"{self.stripe_invoice_id} ({self.status}, {self.total_cents / 100:.2f})"


class NodeCharge(models.Model):
    """What a node's billing is waiting for: the node is provisioned only once the invoice
    that charges for it is paid (billing.services.node_order)."""

    class State(models.TextChoices):
        FREE = "free"  # a plan that costs nothing, or billing off: provisioned at once
        AWAITING_PAYMENT = "awaiting_payment"
        REQUIRES_ACTION = "requires_action"  # 3-D Secure: the customer confirms in the browser
        DECLINED = "declined"  # the card was refused: nothing is provisioned
        PAID = "paid"
        CANCELED = "canceled"  # the node went before it was paid for

    node = models.OneToOneField("fleet.Node", on_delete=models.CASCADE, related_name="charge")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="+")
    subscription = models.ForeignKey(
        Subscription, on_delete=models.SET_NULL, null=True, blank=True, related_name="charges"
    )
    stripe_invoice_id = models.CharField(max_length=255, blank=True, db_index=True)
    state = models.CharField(max_length=20, choices=State.choices)
    message = models.TextField(blank=True, help_text="For the customer: why it waits or failed.")
    created = models.DateTimeField(auto_now_add=True)
    paid_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.node_id}: {self.state}"


class SlaCreditApplied(models.Model):
    """An SLA credit (monitoring.SlaCredit) turned into money: one negative invoice item on the
    account's next invoice. One row per credit, so a repeated run never credits twice."""

    credit = models.OneToOneField(
        "monitoring.SlaCredit", on_delete=models.PROTECT, related_name="applied"
    )
    stripe_invoice_item_id = models.CharField(max_length=255, blank=True)
    amount_cents = models.IntegerField(help_text="Negative: owed back to the customer.")
    currency = models.CharField(max_length=3)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]


class ReconciliationIssue(models.Model):
    """A disagreement between Stripe and our records that reconciliation could not repair,
    for staff. Kept open (last_seen moves on) until a later run no longer finds it."""

    class Kind(models.TextChoices):
        NODE_WITHOUT_SUBSCRIPTION = "node_without_subscription"
        SUBSCRIPTION_WITHOUT_NODES = "subscription_without_nodes"
        QUANTITY_MISMATCH = "quantity_mismatch"
        UNKNOWN_SUBSCRIPTION = "unknown_subscription"

    kind = models.CharField(max_length=40, choices=Kind.choices)
    key = models.CharField(max_length=255, help_text="What it is about (a node or Stripe id).")
    account = models.ForeignKey(
        "accounts.Account", on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    detail = models.TextField()
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "key"],
                condition=models.Q(resolved_at__isnull=True),
                name="reconciliation_issue_open_once",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"


class EconomicAssumptions(models.Model):
    """The inputs of the economics that are not measured, editable by staff (one row; the
    latest is used). Every figure the economics shows lists the ones it used."""

    electricity_usd_per_kwh = models.DecimalField(max_digits=8, decimal_places=4, default=0.15)
    host_hardware_cost_usd = models.DecimalField(
        max_digits=12, decimal_places=2, default=1500, help_text="Upfront cost of one host."
    )
    amortisation_months = models.PositiveIntegerField(default=36)
    modelled_watts_per_node = models.DecimalField(
        max_digits=8,
        decimal_places=2,
        default=35,
        help_text="Used when a node's power is not measured (no RAPL): said so beside it.",
    )
    cloud_tpu_usd_per_hour = models.DecimalField(max_digits=10, decimal_places=4, default=1.20)
    cloud_tpu_ops_per_second = models.FloatField(
        default=2.0e12, help_text="The delivered ops/s a cloud TPU hour buys, measured-equivalent."
    )
    burn_usd_per_month = models.DecimalField(max_digits=12, decimal_places=2, default=20000)
    updated = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(
        "accounts.User", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-updated", "-id"]
        verbose_name_plural = "economic assumptions"
