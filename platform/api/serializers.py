"""Input parsing and output shapes of the API. Business rules stay in the services."""

from rest_framework import serializers

from accounts.models import ApiToken
from fleet.models import (
    Enrollment,
    JobEvent,
    Node,
    NodeAction,
    ProvisioningJob,
    TelemetrySample,
)
from fleet.services.nodes import NAME_RULE, NODE_NAME

# What an agent URL may be, in the schema (`pattern`) and on the server alike: http(s), a host
# name or address, an optional port and path.
AGENT_URL = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!-~]*)?$"

SELF_REPORTED_NOTE = (
    "This node runs on the customer's own machine: its figures are that machine's word, not"
    " measured on a vTPU Cloud host."
)


def text(max_length: int, **kwargs) -> serializers.RegexField:
    """Text input that must hold something besides whitespace (surrounding whitespace is
    trimmed), with that rule in the schema as a pattern."""
    return serializers.RegexField(r"\S", min_length=1, max_length=max_length, **kwargs)


class ErrorSerializer(serializers.Serializer):
    """Every 4xx/5xx answer: a sentence in `detail`, and for a bad field its name with reasons."""

    detail = serializers.CharField(help_text="What went wrong, in words for people.")


class FieldErrorsSerializer(serializers.Serializer):
    """400 for bad input: each bad field's name maps to a list of reasons (`detail` may be
    there too)."""

    detail = serializers.CharField(required=False)


class NodeSerializer(serializers.ModelSerializer):
    self_reported = serializers.SerializerMethodField(
        help_text="True for an enrolled node: its figures are its own machine's word."
    )

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
        ]
        read_only_fields = fields

    def get_self_reported(self, node: Node) -> bool:
        return node.kind == Node.Kind.ENROLLED


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


class ActionResultSerializer(serializers.Serializer):
    action_id = text(50)
    ok = serializers.BooleanField()
    result = serializers.JSONField(required=False, allow_null=True)
    error = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class HeartbeatSerializer(serializers.Serializer):
    node_id = serializers.UUIDField()
    version = serializers.CharField(max_length=50, required=False, allow_blank=True)
    agent_url = serializers.RegexField(AGENT_URL, max_length=255, required=False, allow_null=True)
    telemetry = serializers.DictField(required=False, allow_null=True)
    results = ActionResultSerializer(many=True, required=False)


class HeartbeatReplySerializer(serializers.Serializer):
    state = serializers.CharField()
    heartbeat_seconds = serializers.IntegerField()
    actions = serializers.ListField(child=serializers.DictField())
    acknowledged = serializers.ListField(
        child=serializers.CharField(), help_text="Action ids whose results are on record."
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
    meets_sla = serializers.BooleanField(allow_null=True)
    credit_percent = serializers.IntegerField(
        allow_null=True, help_text="Recorded once the month has closed below the target."
    )


class SlaReportSerializer(serializers.Serializer):
    month = serializers.CharField()
    sla_target = serializers.FloatField()
    closed = serializers.BooleanField(help_text="Whether the month has ended and was closed.")
    results = SlaNodeSerializer(many=True)
