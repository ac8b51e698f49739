"""The operator's hosts, accounts' nodes, their state machine, provisioning jobs and telemetry.

Business rules are in fleet.services; these classes only describe what is stored, and the node
state machine's table (TRANSITIONS) sits next to the states it moves between
(docs/architecture.md, "Node states").
"""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from fleet.crypto import EncryptedTextField


class Host(models.Model):
    """A machine of the operator's pool where nodes are provisioned (over SSH, or this one)."""

    class Kind(models.TextChoices):
        LOCAL = "local", "local (this machine)"
        SSH = "ssh", "SSH"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.SSH)
    address = models.CharField(max_length=255, blank=True, help_text="SSH host name or IP.")
    ssh_port = models.PositiveIntegerField(default=22)
    ssh_user = models.CharField(max_length=100, blank=True)
    ssh_private_key = EncryptedTextField(
        blank=True, help_text="PEM text; encrypted at rest, never shown again."
    )
    ssh_known_hosts = models.TextField(
        blank=True,
        help_text="The host's SSH keys (known_hosts lines), recorded when it was added; Ansible "
        "refuses any other key (StrictHostKeyChecking).",
    )
    python = models.CharField(
        max_length=255, default="python3", help_text="Interpreter on the host (Ansible, node venv)."
    )
    base_dir = models.CharField(
        max_length=500,
        blank=True,
        help_text="Where node directories go on the host; empty for local means NODES_DIR.",
    )
    agent_host = models.CharField(
        max_length=255, default="127.0.0.1", help_text="Address the agents on this host bind to."
    )
    port_range_start = models.PositiveIntegerField(default=18000)
    port_range_end = models.PositiveIntegerField(default=18999)
    tdp_watts = models.FloatField(default=65.0, help_text="CPU TDP, for the agents' power model.")
    capacity = models.PositiveIntegerField(default=4, help_text="Most live nodes at once.")
    is_active = models.BooleanField(default=True, help_text="New nodes go only to active hosts.")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(port_range_start__lte=models.F("port_range_end")),
                name="host_port_range_ordered",
            )
        ]

    def __str__(self) -> str:
        return self.name


class NodeState(models.TextChoices):
    REQUESTED = "requested"
    PROVISIONING = "provisioning"
    READY = "ready"
    DEGRADED = "degraded"
    SUSPENDED = "suspended"
    DEPROVISIONING = "deprovisioning"
    TERMINATED = "terminated"
    FAILED = "failed"


S = NodeState
# The node state machine (docs/architecture.md, "Node states"). Beyond the design:
# requested -> failed (a provisioning job canceled before it started); ready/degraded -> failed
# (the agent's first heartbeat came before its provisioning job failed); deprovisioning -> failed
# (the deprovisioning job failed: visible, and retried by deleting again). Staff may force any
# live node to terminated (fleet.services.nodes.node_force_terminate), outside this table.
TRANSITIONS: dict[str, frozenset[str]] = {
    S.REQUESTED: frozenset({S.PROVISIONING, S.READY, S.DEPROVISIONING, S.FAILED}),
    S.PROVISIONING: frozenset({S.READY, S.FAILED}),
    S.READY: frozenset({S.DEGRADED, S.SUSPENDED, S.DEPROVISIONING, S.FAILED}),
    S.DEGRADED: frozenset({S.READY, S.SUSPENDED, S.DEPROVISIONING, S.FAILED}),
    S.SUSPENDED: frozenset({S.READY, S.DEPROVISIONING}),
    S.DEPROVISIONING: frozenset({S.TERMINATED, S.FAILED}),
    S.FAILED: frozenset({S.PROVISIONING, S.DEPROVISIONING}),
    S.TERMINATED: frozenset(),
}
# A node is "up" in these states (its agent answers and takes work); the flips between up and
# not-up are what uptime is computed from.
UP_STATES = frozenset({S.READY})


class Node(models.Model):
    """An account's vTPU: provisioned by us on a Host, or enrolled from the customer's own machine.

    Two credentials (docs/architecture.md, "Credentials"): the node secret, held by the agent and
    (as a hash) by the control plane, authenticates heartbeats and action results; the access
    token, readable and rotatable by the account, authenticates calls to the agent."""

    class Kind(models.TextChoices):
        PROVISIONED = "provisioned"
        ENROLLED = "enrolled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    account = models.ForeignKey("accounts.Account", on_delete=models.PROTECT, related_name="nodes")
    plan = models.ForeignKey(
        "billing.Plan",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="nodes",
        help_text="What the node is billed by; its SLA comes from it (none: SLA_TARGET).",
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    name = models.CharField(max_length=63)
    kind = models.CharField(max_length=12, choices=Kind.choices, default=Kind.PROVISIONED)
    host = models.ForeignKey(
        Host, on_delete=models.PROTECT, null=True, blank=True, related_name="nodes"
    )
    state = models.CharField(
        max_length=16, choices=NodeState.choices, default=NodeState.REQUESTED, db_index=True
    )
    node_dir = models.CharField(max_length=500, blank=True)
    agent_port = models.PositiveIntegerField(null=True, blank=True)
    agent_url = models.CharField(max_length=255, blank=True)
    secret_sha256 = models.CharField(
        max_length=64,
        unique=True,
        null=True,
        blank=True,
        editable=False,
        help_text="SHA-256 of the node secret (heartbeats); the secret itself is never stored.",
    )
    access_token = EncryptedTextField(
        editable=False, help_text="The customer's token for the agent, encrypted at rest."
    )
    access_token_sha256 = models.CharField(max_length=64, editable=False)
    delete_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="When its account asked for it to be deleted."
    )
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life: heartbeat, health check or poll."
    )
    last_telemetry = models.JSONField(null=True, blank=True)
    version = models.CharField(max_length=50, blank=True)
    scrape_approved = models.BooleanField(
        default=False,
        help_text="Staff checked this enrolled node's agent address: Prometheus' service "
        "discovery may list it. Cleared when the agent reports another address. Provisioned "
        "nodes (addresses of our own hosts) are listed without it.",
    )
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "agent_port"],
                condition=~Q(state="terminated"),
                name="node_unique_live_port_per_host",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({str(self.id)[:8]})"


class NodeTransition(models.Model):
    """One state change of a node, with why it happened."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="transitions")
    from_state = models.CharField(max_length=16, choices=NodeState.choices, blank=True)
    to_state = models.CharField(max_length=16, choices=NodeState.choices)
    cause = models.TextField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created", "id"]
        # Kept for ever; uptime reads a node's (or the fleet's) transitions in a time range.
        indexes = [models.Index(fields=["node", "created"], name="transition_node_time")]

    def __str__(self) -> str:
        return f"{self.from_state} -> {self.to_state}: {self.cause}"


class JobState(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    CANCELED = "canceled"


ACTIVE_JOB_STATES = (JobState.PENDING, JobState.RUNNING)


class ProvisioningJob(models.Model):
    """One ansible-runner run against a node's host (AWX's job, in small)."""

    class Kind(models.TextChoices):
        PROVISION = "provision"
        REPAIR = "repair"  # the provisioning role again, for a node whose agent died
        DEPROVISION = "deprovision"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="jobs")
    kind = models.CharField(max_length=12, choices=Kind.choices, default=Kind.PROVISION)
    state = models.CharField(
        max_length=12, choices=JobState.choices, default=JobState.PENDING, db_index=True
    )
    explanation = models.TextField(blank=True)
    stdout = models.TextField(blank=True)
    rc = models.IntegerField(null=True, blank=True)
    celery_task_id = models.CharField(max_length=255, blank=True)
    worker = models.CharField(max_length=255, blank=True, help_text="Machine running the job.")
    worker_pid = models.IntegerField(null=True, blank=True)
    runner_pid = models.IntegerField(null=True, blank=True, help_text="ansible-playbook's pid.")
    cancel_requested = models.BooleanField(default=False)
    queued_at = models.DateTimeField(
        null=True, blank=True, help_text="Last time its task was sent to the broker."
    )
    last_event_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["node"],
                condition=Q(state__in=["pending", "running"]),
                name="job_one_active_per_node",
            )
        ]

    def __str__(self) -> str:
        return f"job {self.pk} {self.kind} {self.state}"


class JobEvent(models.Model):
    """One Ansible event, stored once per counter (a retried batch inserts nothing twice)."""

    job = models.ForeignKey(ProvisioningJob, on_delete=models.CASCADE, related_name="events")
    counter = models.PositiveIntegerField()
    event = models.CharField(max_length=100)
    host = models.CharField(max_length=255, blank=True)
    task = models.CharField(max_length=500, blank=True)
    stdout = models.TextField(blank=True)
    failed = models.BooleanField(default=False)
    changed = models.BooleanField(default=False)
    created = models.DateTimeField()

    class Meta:
        ordering = ["counter"]
        constraints = [
            models.UniqueConstraint(fields=["job", "counter"], name="jobevent_unique_counter")
        ]

    def __str__(self) -> str:
        return f"{self.counter} {self.event}"


class TelemetrySample(models.Model):
    """A node's telemetry at one moment: the headline figures as columns, the rest as JSON."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="samples")
    created = models.DateTimeField(auto_now_add=True, db_index=True)
    ops_per_cycle = models.FloatField(null=True, blank=True)
    throughput_gops = models.FloatField(null=True, blank=True)
    power_watts = models.FloatField(null=True, blank=True)
    mops_per_watt = models.FloatField(null=True, blank=True)
    cache_hit_rate = models.FloatField(null=True, blank=True)
    # The counters the economics sum over consecutive samples, as plain columns (reading them
    # from the JSON costs PostgreSQL a parse per row); null when the telemetry had none.
    ops_total = models.BigIntegerField(
        null=True, blank=True, help_text="Cumulative runtime ops counter (telemetry `ops`)."
    )
    uptime_seconds = models.FloatField(null=True, blank=True)
    energy_joules = models.FloatField(
        null=True, blank=True, help_text="Cumulative energy (telemetry `lifetime.energy_joules`)."
    )
    energy_source = models.TextField(
        null=True, blank=True, help_text="Where the power figure came from (`sources.power_watts`)."
    )
    data = models.JSONField(default=dict)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["node", "-created"], name="sample_node_recent")]


class NodeAction(models.Model):
    """Work for a node's agent, carried by heartbeat replies (works behind NAT).

    Delivered at least once: it stays pending until the agent reports its result and is sent
    again after a timeout; the agent applies an action id once, so a lost reply loses nothing."""

    class Kind(models.TextChoices):
        BENCHMARK = "benchmark"
        LOAD_MODEL = "load_model"  # make a model resident (docs/architecture.md, "Resident models")
        SUSPEND = "suspend"
        RESUME = "resume"
        ROTATE_TOKEN = "rotate_token"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="actions")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    payload = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True, help_text="Last delivery.")
    deliveries = models.PositiveIntegerField(default=0)
    completed_at = models.DateTimeField(null=True, blank=True)
    ok = models.BooleanField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["created", "id"]
        # Every heartbeat looks up its node's pending actions; completed ones pile up.
        indexes = [
            models.Index(
                fields=["node", "created"],
                condition=models.Q(completed_at__isnull=True),
                name="action_pending",
            )
        ]


class Enrollment(models.Model):
    """A one-time link that turns a customer's own machine into a node of their account."""

    account = models.ForeignKey(
        "accounts.Account", on_delete=models.CASCADE, related_name="enrollments"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    secret_sha256 = models.CharField(max_length=64, unique=True, editable=False)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    node = models.OneToOneField(
        Node, on_delete=models.SET_NULL, null=True, blank=True, related_name="enrollment"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]
