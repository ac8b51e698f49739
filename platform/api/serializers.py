"""Input parsing and output shapes of the API. Business rules stay in the services."""

from decimal import Decimal

from drf_spectacular.utils import extend_schema_field, inline_serializer
from rest_framework import serializers

from accounts.models import ApiToken
from billing import economics
from billing.models import (
    BillingCustomer,
    EconomicAssumptions,
    Invoice,
    NodeCharge,
    Plan,
    ReconciliationIssue,
    Subscription,
)
from fleet.models import (
    Enrollment,
    JobEvent,
    Node,
    NodeAction,
    ProvisioningJob,
    TelemetrySample,
)
from fleet.services.nodes import NAME_RULE, NODE_NAME
from monitoring.benchmarks import SIZES as BENCHMARK_SIZES
from monitoring.benchmarks import WORKLOAD_NAME
from monitoring.models import (
    Alert,
    AlertChannel,
    BenchmarkResult,
    BenchmarkRun,
    DeliveryAttempt,
    Notification,
)

# What an agent URL may be, in the schema (`pattern`) and on the server alike: http(s), a host
# name or address, an optional port and path.
AGENT_URL = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!-~]*)?$"

SELF_REPORTED_NOTE = (
    "This node runs on the customer's own machine: its figures are that machine's word, not"
    " measured on a vTPU Cloud host."
)


class StrictRegexField(serializers.RegexField):
    """A string, never a number turned into one (the schema says `type: string`)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def text(max_length: int, **kwargs) -> serializers.RegexField:
    """Text input that must hold something besides whitespace (surrounding whitespace is
    trimmed), with that rule in the schema as a pattern."""
    return StrictRegexField(r"\S", min_length=1, max_length=max_length, **kwargs)


class ErrorSerializer(serializers.Serializer):
    """Every 4xx/5xx answer: a sentence in `detail`, and for a bad field its name with reasons."""

    detail = serializers.CharField(help_text="What went wrong, in words for people.")


class FieldErrorsSerializer(serializers.Serializer):
    """400 for bad input: each bad field's name maps to a list of reasons (`detail` may be
    there too)."""

    detail = serializers.CharField(required=False)


class NodePaymentSerializer(serializers.Serializer):
    state = serializers.ChoiceField(
        choices=NodeCharge.State.choices,
        help_text="A node on a paid plan is provisioned once its invoice is paid.",
    )
    message = serializers.CharField(help_text="Why it waits, or why the payment failed.")
    invoice = serializers.IntegerField(allow_null=True, help_text="GET /api/v1/billing/invoices")
    paid_at = serializers.DateTimeField(allow_null=True)


class NodeSerializer(serializers.ModelSerializer):
    self_reported = serializers.SerializerMethodField(
        help_text="True for an enrolled node: its figures are its own machine's word."
    )
    plan = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True, help_text="The billing plan (GET /api/v1/billing/plans)."
    )
    payment = serializers.SerializerMethodField(help_text="Null when the node has no plan.")

    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "kind",
            "state",
            "self_reported",
            "agent_url",
            "agent_port",
            "version",
            "last_heartbeat_at",
            "last_seen_at",
            "delete_requested_at",
            "created",
            "updated",
            "plan",
            "payment",
        ]
        read_only_fields = fields

    def get_self_reported(self, node: Node) -> bool:
        return node.kind == Node.Kind.ENROLLED

    @extend_schema_field(NodePaymentSerializer(allow_null=True))
    def get_payment(self, node: Node) -> dict | None:
        try:
            charge = node.charge  # select_related by the views that list nodes
        except NodeCharge.DoesNotExist:
            return None
        invoice = None
        if charge.stripe_invoice_id:
            invoice = (
                Invoice.objects.filter(stripe_invoice_id=charge.stripe_invoice_id)
                .values_list("pk", flat=True)
                .first()
            )
        return {
            "state": charge.state,
            "message": charge.message,
            "invoice": invoice,
            "paid_at": charge.paid_at,
        }


class NodeCreateSerializer(serializers.Serializer):
    # A RegexField, so that the schema carries the rule as `pattern` (what a client may send).
    name = serializers.RegexField(
        NODE_NAME, max_length=63, error_messages={"invalid": f"Use {NAME_RULE}."}
    )
    # An id, not a PrimaryKeyRelatedField: an unknown host is 404 like any unknown thing (a
    # field error would answer a schema-valid number with 400).
    host = serializers.IntegerField(
        min_value=1, max_value=2**63 - 1, required=False, help_text="Staff only: the host to use."
    )
    plan = serializers.IntegerField(
        min_value=1,
        max_value=2**63 - 1,
        required=False,
        help_text="The plan to bill it by (default: the cheapest active one).",
    )


class NodeDeclinedSerializer(serializers.Serializer):
    detail = serializers.CharField()
    node = NodeSerializer(required=False, help_text="The node, held unprovisioned (a decline).")


class NodeOrderedSerializer(NodeSerializer):
    client_secret = serializers.SerializerMethodField(
        help_text="When the bank asks for 3-D Secure (payment.state requires_action): confirm"
        " with Stripe.js `confirmCardPayment(client_secret)`; the node is provisioned then."
    )

    class Meta(NodeSerializer.Meta):
        fields = [*NodeSerializer.Meta.fields, "client_secret"]
        read_only_fields = fields

    def get_client_secret(self, node: Node) -> str | None:
        return self.context.get("client_secret") or None


class NodeCredentialsSerializer(serializers.Serializer):
    agent_url = serializers.CharField()
    token = serializers.CharField(
        help_text="Your access token for the node's agent (Authorization: Bearer ...). It is"
        " not the node's own secret: rotating it never disturbs the node's heartbeats."
    )
    rotation_pending = serializers.BooleanField(
        help_text="True until the agent has applied the latest rotation (until then the"
        " previous token may still work and this one may not yet)."
    )


class TransitionSerializer(serializers.Serializer):
    from_state = serializers.CharField()
    to_state = serializers.CharField()
    cause = serializers.CharField()
    created = serializers.DateTimeField()


class JobSerializer(serializers.ModelSerializer):
    class Meta:
        model = ProvisioningJob
        fields = [
            "id",
            "node",
            "kind",
            "state",
            "explanation",
            "rc",
            "cancel_requested",
            "created",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class JobDetailSerializer(JobSerializer):
    class Meta(JobSerializer.Meta):
        fields = [*JobSerializer.Meta.fields, "stdout"]
        read_only_fields = fields


class JobEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobEvent
        fields = ["counter", "event", "host", "task", "stdout", "failed", "changed", "created"]
        read_only_fields = fields


class JobEventsSerializer(serializers.Serializer):
    job_state = serializers.ChoiceField(choices=ProvisioningJob._meta.get_field("state").choices)
    events = JobEventSerializer(many=True)
    last_counter = serializers.IntegerField(
        help_text="Pass it as ?after= to get only newer events (a live log polls this way)."
    )


class TelemetrySampleSerializer(serializers.ModelSerializer):
    class Meta:
        model = TelemetrySample
        fields = [
            "created",
            "ops_per_cycle",
            "throughput_gops",
            "power_watts",
            "mops_per_watt",
            "cache_hit_rate",
            "data",
        ]
        read_only_fields = fields


class NodeTelemetrySerializer(serializers.Serializer):
    latest = serializers.JSONField(
        allow_null=True, help_text="The agent's latest telemetry (figures with their sources)."
    )
    self_reported = serializers.BooleanField()
    note = serializers.CharField(allow_blank=True)
    samples = TelemetrySampleSerializer(many=True)


class ActionSerializer(serializers.ModelSerializer):
    type = serializers.CharField(source="kind")

    class Meta:
        model = NodeAction
        fields = ["id", "type", "payload", "created", "delivered_at", "deliveries",
                  "completed_at", "ok", "result", "error"]  # fmt: skip
        read_only_fields = fields


class ActionCreateSerializer(serializers.Serializer):
    type = serializers.ChoiceField(
        choices=["benchmark"], help_text="What the agent should do (customers: benchmark)."
    )
    workloads = serializers.ListField(
        child=text(100),
        required=False,
        allow_null=True,
        max_length=50,
        help_text="Benchmark workloads by name (default: the quick suite).",
    )
    quick = serializers.BooleanField(required=False, default=True)


class ModelLoadSerializer(serializers.Serializer):
    model = StrictRegexField(
        r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        max_length=100,
        help_text="A model of the node's catalogue, e.g. all-MiniLM-L6-v2 (GET <agent>/vTPU/models"
        " lists them); the agent reports in the action's result why one cannot be loaded.",
    )
    precision = serializers.ChoiceField(
        choices=["fp32", "bf16", "int8", "int8-dynamic"],
        default="fp32",
        help_text="The weights' precision (the node's vtpu.models.bert.PRECISIONS): int8 keeps"
        " cosine >= 0.999 with half the memory; int8-dynamic is faster and less exact; bf16"
        " needs AVX512_BF16 or AMX on the node (elsewhere the action fails saying so).",
    )


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created", "last_used_at", "revoked_at"]
        read_only_fields = fields


class TokenCreateSerializer(serializers.Serializer):
    name = text(100)


class CreatedTokenSerializer(TokenSerializer):
    token = serializers.CharField(help_text="The secret; shown this once, never again.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class EnrollmentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Enrollment
        fields = ["id", "created", "expires_at", "used_at", "node"]
        read_only_fields = fields


class EnrollmentCreatedSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    url = serializers.CharField()
    command = serializers.CharField()
    expires_at = serializers.DateTimeField()


class EnrollSerializer(serializers.Serializer):
    secret = text(200)
    hostname = text(255)
    agent_url = serializers.RegexField(AGENT_URL, max_length=255, required=False, allow_null=True)
    port = serializers.IntegerField(min_value=1, max_value=65535, required=False, allow_null=True)


class EnrolledSerializer(serializers.Serializer):
    node_id = serializers.UUIDField()
    node_secret = serializers.CharField(
        help_text="The node's own secret for its heartbeats; given once, never shown again."
    )
    access_token_sha256 = serializers.CharField(
        help_text="SHA-256 of the account's access token for this agent (the agent needs only"
        " the hash)."
    )
    heartbeat_seconds = serializers.IntegerField()
    control_plane_url = serializers.CharField()


def no_nul(value: object) -> None:
    """JSON that the database can store: PostgreSQL's jsonb refuses NUL characters in text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            raise serializers.ValidationError(
                "Text in this JSON holds a NUL character (\\u0000), which cannot be stored."
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class ActionResultSerializer(serializers.Serializer):
    action_id = text(50)
    ok = serializers.BooleanField()
    result = serializers.JSONField(required=False, allow_null=True, validators=[no_nul])
    error = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class HeartbeatSerializer(serializers.Serializer):
    node_id = serializers.UUIDField()
    version = serializers.CharField(max_length=50, required=False, allow_blank=True)
    agent_url = serializers.RegexField(AGENT_URL, max_length=255, required=False, allow_null=True)
    telemetry = serializers.DictField(required=False, allow_null=True, validators=[no_nul])
    results = ActionResultSerializer(many=True, required=False)


class HeartbeatReplySerializer(serializers.Serializer):
    state = serializers.CharField()
    heartbeat_seconds = serializers.IntegerField()
    actions = serializers.ListField(child=serializers.DictField())
    acknowledged = serializers.ListField(
        child=serializers.CharField(), help_text="Action ids whose results are on record."
    )
    scrape_token_sha256 = serializers.CharField(
        allow_null=True,
        help_text="SHA-256 (hex) of the fleet's scrape token, which the agent accepts for "
        "GET /metrics only; null when there is none.",
    )


# ---- monitoring: uptime, flips, maintenance, SLA ----------------------------------------------


class UptimeSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    uptime_ratio = serializers.FloatField(
        allow_null=True, help_text="up / (up + down); null when the node neither served nor failed."
    )
    up_seconds = serializers.IntegerField()
    down_seconds = serializers.IntegerField()
    maintenance_seconds = serializers.IntegerField(help_text="Down inside planned maintenance.")
    excluded_seconds = serializers.IntegerField(
        help_text="Not yet serving, suspended by billing, or deleted: not counted."
    )


class NodeUptimeSerializer(serializers.Serializer):
    month = serializers.CharField(help_text="YYYY-MM (UTC).")
    sla_target = serializers.FloatField()
    this_month = UptimeSerializer(help_text="The calendar month, up to now while it runs.")
    last_30_days = UptimeSerializer()


class FlipSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    up = serializers.BooleanField()
    cause = serializers.CharField()
    category = serializers.ChoiceField(
        choices=[
            "recovered",
            "heartbeat_late",
            "health_check_failed",
            "agent_errors",
            "suspended_by_account",
            "suspended_billing",
            "maintenance",
            "other",
        ],
        help_text="The cause as a category; `recovered` for a flip up.",
    )


class MaintenanceWindowSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    scope = serializers.ChoiceField(choices=["node", "host", "fleet"])
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    reason = serializers.CharField()


class SlaNodeSerializer(serializers.Serializer):
    node = serializers.UUIDField()
    name = serializers.CharField()
    uptime_ratio = serializers.FloatField(allow_null=True)
    down_seconds = serializers.IntegerField()
    sla_target = serializers.FloatField(help_text="The node's target: its plan's, or the default.")
    meets_sla = serializers.BooleanField(allow_null=True)
    credit_percent = serializers.IntegerField(
        allow_null=True, help_text="Recorded once the month has closed below the target."
    )


class AccountUptimeSerializer(serializers.Serializer):
    """The account's nodes together: up / (up + down) over all of them."""

    this_month = serializers.FloatField(allow_null=True)
    last_30_days = serializers.FloatField(allow_null=True)
    down_seconds_this_month = serializers.IntegerField()


class SlaReportSerializer(serializers.Serializer):
    month = serializers.CharField()
    sla_target = serializers.FloatField(
        help_text="The default target (SLA_TARGET); a node on a plan has its plan's (per row)."
    )
    closed = serializers.BooleanField(help_text="Whether the month has ended and was closed.")
    account = AccountUptimeSerializer()
    results = SlaNodeSerializer(many=True)


# ---- alerts -----------------------------------------------------------------------------------


class DeliveryAttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeliveryAttempt
        fields = ["at", "ok", "status_code", "error", "duration_ms"]
        read_only_fields = fields


class NotificationSerializer(serializers.ModelSerializer):
    channel = serializers.CharField(source="channel.name")
    delivery_attempts = DeliveryAttemptSerializer(many=True, read_only=True)

    class Meta:
        model = Notification
        fields = [
            "id",
            "channel",
            "event",
            "state",
            "attempts",
            "created",
            "sent_at",
            "next_attempt_at",
            "last_error",
            "delivery_attempts",
        ]
        read_only_fields = fields


class AlertSerializer(serializers.ModelSerializer):
    node_name = serializers.CharField(source="node.name")

    class Meta:
        model = Alert
        fields = [
            "id",
            "node",
            "node_name",
            "rule",
            "workload",
            "severity",
            "state",
            "summary",
            "details",
            "opened_at",
            "resolved_at",
            "resolution",
            "last_notified_at",
        ]
        read_only_fields = fields


class AlertDetailSerializer(AlertSerializer):
    notifications = NotificationSerializer(many=True, read_only=True)

    class Meta(AlertSerializer.Meta):
        fields = [*AlertSerializer.Meta.fields, "notifications"]
        read_only_fields = fields


class AlertChannelSerializer(serializers.ModelSerializer):
    class Meta:
        model = AlertChannel
        fields = ["id", "kind", "name", "target", "enabled", "created"]
        read_only_fields = fields


# A webhook's URL: http(s), a host, a port that is one, a path.
WEBHOOK_URL = (
    r"^https?://[A-Za-z0-9.-]+"
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
    r"(/[!-~]*)?$"
)
# An address Django's validator accepts (dot-atom local part, a domain with a TLD), as a schema
# pattern; the webhook URL as for agents.
EMAIL = r"^[A-Za-z0-9_%+-]+(\.[A-Za-z0-9_%+-]+)*@([A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?\.)+[A-Za-z]{2,20}$"


class EmailChannelCreateSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=[AlertChannel.Kind.EMAIL])
    name = text(100)
    target = StrictRegexField(
        EMAIL,
        max_length=254,
        help_text="The e-mail address.",
        error_messages={"invalid": "This is not an e-mail address (name@example.com)."},
    )


class WebhookChannelCreateSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=[AlertChannel.Kind.WEBHOOK])
    name = text(100)
    target = StrictRegexField(
        WEBHOOK_URL,
        max_length=500,
        help_text="The URL messages are POSTed to (https, on a public address, in production).",
        error_messages={"invalid": "This is not an http:// or https:// URL with a host."},
    )


class AlertChannelCreateSerializer(serializers.Serializer):
    """Reads either shape (the schema shows both, by `kind`)."""

    kind = serializers.ChoiceField(choices=AlertChannel.Kind.choices)
    name = text(100)
    target = text(500, help_text="An e-mail address, or the webhook's URL.")

    def validate(self, data: dict) -> dict:
        shape = (
            EmailChannelCreateSerializer
            if data["kind"] == AlertChannel.Kind.EMAIL
            else WebhookChannelCreateSerializer
        )(data=self.initial_data)
        shape.is_valid(raise_exception=True)
        return data


class AlertChannelUpdateSerializer(serializers.Serializer):
    name = text(100, required=False)
    target = text(500, required=False)
    enabled = serializers.BooleanField(required=False)
    rotate_secret = serializers.BooleanField(
        required=False, default=False, help_text="A webhook's new signing secret is answered once."
    )


class AlertChannelWithSecretSerializer(AlertChannelSerializer):
    secret = serializers.CharField(
        allow_blank=True,
        help_text="A webhook's signing secret (HMAC-SHA256 over '<t>.<body>'); empty for e-mail."
        " Answered when made or rotated.",
    )

    class Meta(AlertChannelSerializer.Meta):
        fields = [*AlertChannelSerializer.Meta.fields, "secret"]
        read_only_fields = fields


# ---- monitoring: continuous benchmarks --------------------------------------------------------


class BenchmarkResultSerializer(serializers.ModelSerializer):
    class Meta:
        model = BenchmarkResult
        fields = ["workload", "ops_per_second", "ops_per_cycle", "speedup", "baseline", "correct",
                  "error", "sources", "created"]  # fmt: skip
        read_only_fields = fields
        extra_kwargs = {
            "speedup": {"help_text": "baseline seconds / ours, measured in the same run"},
            "correct": {"help_text": "Checked against a reference; null: no reference to check."},
            "sources": {"help_text": "Where each figure comes from, as the node said."},
        }


class BenchmarkRunSerializer(serializers.ModelSerializer):
    results = BenchmarkResultSerializer(many=True, read_only=True)

    class Meta:
        model = BenchmarkRun
        fields = ["id", "node", "trigger", "state", "reason", "size", "machine", "created",
                  "finished_at", "results"]  # fmt: skip
        read_only_fields = fields


class BenchmarkRequestSerializer(serializers.Serializer):
    workloads = serializers.ListField(
        child=serializers.RegexField(WORKLOAD_NAME, max_length=50),
        required=False,
        allow_null=True,
        min_length=1,
        max_length=50,
        help_text="Workloads by name (e.g. gemm_1024); absent or null: the whole suite. A name"
        " the node's runtime does not know fails the run with the list of valid ones.",
    )
    size = serializers.ChoiceField(
        choices=list(BENCHMARK_SIZES),
        required=False,
        help_text="tiny (seconds), quick or full; default: the platform's BENCHMARK_SIZE.",
    )


class FigureStatsSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="Results that measured this figure.")
    median = serializers.FloatField()
    p25 = serializers.FloatField()
    p75 = serializers.FloatField()
    min = serializers.FloatField()
    max = serializers.FloatField()


class WorkloadStatsSerializer(serializers.Serializer):
    workload = serializers.CharField()
    count = serializers.IntegerField(help_text="Correct results of completed runs in the window.")
    speedup = FigureStatsSerializer(allow_null=True)
    ops_per_cycle = FigureStatsSerializer(allow_null=True)
    ops_per_second = FigureStatsSerializer(allow_null=True)


class NodeBenchmarkStatsSerializer(serializers.Serializer):
    node = serializers.UUIDField()
    days = serializers.IntegerField()
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    workloads = WorkloadStatsSerializer(many=True)


# ---- billing ----------------------------------------------------------------------------------


class PlanSerializer(serializers.ModelSerializer):
    class Meta:
        model = Plan
        fields = [
            "id",
            "name",
            "amount_cents",
            "currency",
            "interval",
            "node_kind",
            "sla_target",
            "sla_credit_percent",
        ]
        read_only_fields = fields


class CardSerializer(serializers.Serializer):
    brand = serializers.CharField()
    last4 = serializers.CharField()
    exp = serializers.CharField(help_text="MM/YYYY")


class SubscriptionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Subscription
        fields = [
            "id",
            "plan",
            "status",
            "quantity",
            "current_period_start",
            "current_period_end",
            "cancel_at_period_end",
            "ended_at",
        ]
        read_only_fields = fields


class BillingSerializer(serializers.Serializer):
    enabled = serializers.BooleanField(help_text="False: billing is off here (no Stripe key).")
    publishable_key = serializers.CharField()
    stripe_js_url = serializers.CharField()
    card = CardSerializer(allow_null=True)
    standing = serializers.ChoiceField(choices=BillingCustomer.Standing.choices)
    past_due_since = serializers.DateTimeField(allow_null=True)
    suspend_at = serializers.DateTimeField(allow_null=True)
    deprovision_at = serializers.DateTimeField(allow_null=True)
    cancel_requested_at = serializers.DateTimeField(allow_null=True)
    subscriptions = SubscriptionSerializer(many=True)


class SetupIntentSerializer(serializers.Serializer):
    id = serializers.CharField()
    client_secret = serializers.CharField(
        help_text="For Stripe.js `confirmCardSetup`; the card number goes to Stripe, not to us."
    )
    publishable_key = serializers.CharField()
    stripe_js_url = serializers.CharField()


class PaymentMethodSaveSerializer(serializers.Serializer):
    setup_intent = StrictRegexField(
        r"^seti_[A-Za-z0-9_]+$", max_length=255, help_text="The confirmed SetupIntent's id."
    )


class SavedCardSerializer(serializers.Serializer):
    card = CardSerializer()


class InvoiceSerializer(serializers.ModelSerializer):
    payment = serializers.SerializerMethodField()

    class Meta:
        model = Invoice
        fields = [
            "id",
            "stripe_invoice_id",
            "status",
            "currency",
            "total_cents",
            "amount_due_cents",
            "amount_paid_cents",
            "period_start",
            "period_end",
            "stripe_created",
            "paid_at",
            "hosted_invoice_url",
            "payment",
        ]
        read_only_fields = fields

    @extend_schema_field(
        inline_serializer(
            "InvoicePayment",
            {
                "id": serializers.CharField(),
                "status": serializers.CharField(),
                "error": serializers.CharField(),
            },
            allow_null=True,
        )
    )
    def get_payment(self, invoice: Invoice) -> dict | None:
        if not invoice.payment_intent_id:
            return None
        return {
            "id": invoice.payment_intent_id,
            "status": invoice.payment_status,
            "error": invoice.payment_error,
        }


class ReconciliationIssueSerializer(serializers.ModelSerializer):
    class Meta:
        model = ReconciliationIssue
        fields = ["id", "kind", "key", "account", "detail", "first_seen", "last_seen"]
        read_only_fields = fields


# ---- economics (staff only) -----------------------------------------------------------------


class EconomicAssumptionsSerializer(serializers.ModelSerializer):
    """The staff's assumptions; a PUT may give any of them (the rest are kept) and records a
    new row with who made it."""

    updated = serializers.DateTimeField(
        read_only=True, allow_null=True, help_text="Null: the defaults (none saved yet)."
    )
    updated_by = serializers.SlugRelatedField(
        slug_field="username", read_only=True, allow_null=True
    )
    source = serializers.SerializerMethodField(help_text="Whose assumptions these are.")

    class Meta:
        model = EconomicAssumptions
        fields = [
            *economics.ASSUMPTION_FIELDS,
            "updated",
            "updated_by",
            "source",
        ]
        extra_kwargs = {
            "electricity_usd_per_kwh": {"min_value": Decimal(0)},
            "host_hardware_cost_usd": {"min_value": Decimal("0.01")},
            "amortisation_months": {"min_value": 1, "max_value": 600},
            "modelled_watts_per_node": {"min_value": Decimal("0.01")},
            "cloud_tpu_usd_per_hour": {"min_value": Decimal("0.0001")},
            "cloud_tpu_ops_per_second": {"min_value": 1.0, "max_value": 1e21},
            "burn_usd_per_month": {"min_value": Decimal("0.01")},
        }

    def get_source(self, row: EconomicAssumptions) -> str:
        return economics.assumptions_source(row)

    def validate(self, attrs: dict) -> dict:
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            known = ", ".join(ASSUMPTIONS)
            raise serializers.ValidationError(
                {name: [f"No such assumption; they are: {known}."] for name in unknown}
            )
        return attrs


ASSUMPTIONS = EconomicAssumptionsSerializer.Meta.fields[:7]


class EconomicFigureSerializer(serializers.Serializer):
    value = serializers.JSONField(
        allow_null=True, help_text="Null when it cannot be computed; decimals as exact strings."
    )
    unit = serializers.CharField()
    reason = serializers.CharField(allow_null=True, help_text="Why the value is null.")
    inputs = serializers.DictField(help_text="The numbers it was computed from.")
    assumptions = serializers.DictField(help_text="The staff's assumptions it used.")
    sources = serializers.DictField(
        child=serializers.CharField(), help_text="Where each input came from."
    )


class EconomicsWindowSerializer(serializers.Serializer):
    days = serializers.IntegerField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()


class NodeCostSerializer(serializers.Serializer):
    node = serializers.UUIDField()
    name = serializers.CharField()
    account = serializers.CharField()
    kind = serializers.CharField()
    host = serializers.CharField(allow_null=True)
    state = serializers.CharField()
    cost_per_trillion_ops = EconomicFigureSerializer()


class CostPerTrillionOpsSerializer(serializers.Serializer):
    fleet = EconomicFigureSerializer()
    nodes = NodeCostSerializer(many=True)


class HostBreakEvenSerializer(serializers.Serializer):
    host = serializers.CharField()
    host_id = serializers.IntegerField()
    hours_to_repay_from_revenue = EconomicFigureSerializer()
    hours_to_repay_vs_cloud_tpu = EconomicFigureSerializer()


class MrrMonthSerializer(serializers.Serializer):
    month = serializers.CharField(help_text="YYYY-MM")
    at = serializers.DateTimeField(help_text="The moment MRR was taken: month end, or now.")
    mrr_usd = serializers.DecimalField(max_digits=14, decimal_places=2)
    paying_accounts = serializers.IntegerField()
    paid_usd = serializers.DecimalField(
        max_digits=14, decimal_places=2, help_text="Paid invoices of periods starting that month."
    )


class EconomicsReportSerializer(serializers.Serializer):
    generated_at = serializers.DateTimeField()
    window = EconomicsWindowSerializer()
    assumptions = serializers.DictField(help_text="The assumptions used, with their source.")
    cost_per_trillion_ops = CostPerTrillionOpsSerializer()
    break_even = HostBreakEvenSerializer(many=True)
    roi_3_years = serializers.DictField(
        child=EconomicFigureSerializer(), help_text="ranch, own_node, managed."
    )
    revenue = serializers.DictField(
        child=EconomicFigureSerializer(),
        help_text="mrr, paying_accounts, churn_monthly, revenue_per_node,"
        " revenue_collected_30_days, burn_coverage.",
    )
    mrr_history = MrrMonthSerializer(many=True)
