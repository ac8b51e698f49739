"""Input parsing and output shapes of the API. Business rules stay in the services."""

from rest_framework import serializers

from accounts.models import ApiToken
from fleet.models import Host, JobEvent, Node, ProvisioningJob, TelemetrySample
from fleet.services import NAME_RULE, NODE_NAME


class NodeSerializer(serializers.ModelSerializer):
    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "kind",
            "state",
            "agent_url",
            "agent_port",
            "version",
            "last_heartbeat_at",
            "created",
            "updated",
        ]
        read_only_fields = fields


class NodeCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=63)
    host = serializers.PrimaryKeyRelatedField(
        queryset=Host.objects.all(), required=False, help_text="Staff only: the host to use."
    )

    def validate_name(self, value: str) -> str:
        if not NODE_NAME.match(value):
            raise serializers.ValidationError(f"Use {NAME_RULE}.")
        return value


class NodeCredentialsSerializer(serializers.Serializer):
    agent_url = serializers.CharField()
    token = serializers.CharField(help_text="Bearer token of the node's agent endpoints.")


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


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created", "last_used_at", "revoked_at"]
        read_only_fields = fields


class TokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)


class CreatedTokenSerializer(TokenSerializer):
    token = serializers.CharField(help_text="The secret; shown this once, never again.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class EnrollmentCreatedSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    url = serializers.CharField()
    command = serializers.CharField()
    expires_at = serializers.DateTimeField()


class EnrollSerializer(serializers.Serializer):
    secret = serializers.CharField(max_length=200)
    hostname = serializers.CharField(max_length=255)
    agent_url = serializers.URLField(max_length=255, required=False, allow_null=True)
    port = serializers.IntegerField(min_value=1, max_value=65535, required=False, allow_null=True)


class EnrolledSerializer(serializers.Serializer):
    node_id = serializers.UUIDField()
    node_token = serializers.CharField()
    heartbeat_seconds = serializers.IntegerField()
    control_plane_url = serializers.CharField()


class ActionResultSerializer(serializers.Serializer):
    action_id = serializers.CharField(max_length=50)
    ok = serializers.BooleanField()
    result = serializers.JSONField(required=False, allow_null=True)
    error = serializers.CharField(required=False, allow_null=True, allow_blank=True)


class HeartbeatSerializer(serializers.Serializer):
    node_id = serializers.UUIDField()
    version = serializers.CharField(max_length=50, required=False, allow_blank=True)
    agent_url = serializers.URLField(max_length=255, required=False, allow_null=True)
    telemetry = serializers.DictField(required=False, allow_null=True)
    results = ActionResultSerializer(many=True, required=False)


class HeartbeatReplySerializer(serializers.Serializer):
    state = serializers.CharField()
    heartbeat_seconds = serializers.IntegerField()
    actions = serializers.ListField(child=serializers.DictField())
