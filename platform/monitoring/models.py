"""What monitoring stores beyond the fleet's own record. Up/down flips are not stored again: they
are the node's transitions (fleet.models.NodeTransition) read through monitoring.uptime
(docs/architecture.md, "Uptime and SLA")."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from fleet.crypto import EncryptedTextField


class MaintenanceWindow(models.Model):
    """Planned work, entered by staff: downtime inside it does not count. For one node, every
    node of one host, or (neither set) the whole fleet; customers see theirs in advance."""

    node = models.ForeignKey(
        "fleet.Node", on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    host = models.ForeignKey(
        "fleet.Host", on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=500, help_text="Shown to the customers it affects.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["starts_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")), name="maintenance_ends_after_start"
            ),
            models.CheckConstraint(
                condition=Q(node__isnull=True) | Q(host__isnull=True),
                name="maintenance_node_or_host_or_fleet",
            ),
        ]

    def __str__(self) -> str:
        scope = self.node or self.host or "whole fleet"
        return f"{scope}: {self.starts_at:%Y-%m-%d %H:%M}–{self.ends_at:%H:%M} {self.reason}"


class SlaCredit(models.Model):
    """A month that closed below the node's SLA: recorded once per node and month (billing turns
    it into money)."""

    node = models.ForeignKey("fleet.Node", on_delete=models.PROTECT, related_name="sla_credits")
    account = models.ForeignKey(
        "accounts.Account", on_delete=models.PROTECT, related_name="sla_credits"
    )
    month = models.DateField(help_text="The first day of the month (UTC).")
    uptime_ratio = models.FloatField()
    sla_target = models.FloatField()
    down_seconds = models.PositiveIntegerField()
    credit_percent = models.PositiveIntegerField(
        help_text="Share of the node's monthly fee owed back (SLA_CREDIT_SCHEDULE)."
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-month", "node"]
        constraints = [
            models.UniqueConstraint(fields=["node", "month"], name="sla_credit_once_per_month")
        ]

    def __str__(self) -> str:
        return f"{self.node} {self.month:%Y-%m}: {self.uptime_ratio:.5f} → {self.credit_percent} %"


class SlaMonthClosed(models.Model):
    """A month whose SLA was closed: later runs of the hourly task skip it at once."""

    month = models.DateField(unique=True)
    credits = models.PositiveIntegerField()
    closed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-month"]


class BenchmarkRun(models.Model):
    """One short benchmark of a node, asked through its action channel (so NAT'ed nodes work
    too) by the hourly schedule, a customer or staff; or a scheduled run that was skipped, with
    the reason (docs/architecture.md, "Continuous benchmarks")."""

    class State(models.TextChoices):
        PENDING = "pending"  # the action is out; its result has not come back
        DONE = "done"
        FAILED = "failed"  # the agent reported an error, or the action never completed
        SKIPPED = "skipped"  # the schedule did not run it (node busy, down, suspended)

    class Trigger(models.TextChoices):
        SCHEDULE = "schedule"
        CUSTOMER = "customer"
        STAFF = "staff"

    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, related_name="benchmark_runs")
    action = models.OneToOneField(
        "fleet.NodeAction",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="benchmark_run",
    )
    trigger = models.CharField(max_length=10, choices=Trigger.choices)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    reason = models.TextField(blank=True, help_text="Why it was skipped or failed.")
    size = models.CharField(max_length=10, blank=True)
    machine = models.JSONField(default=dict, blank=True, help_text="The node's CPU, as it said.")
    created = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [
            models.Index(fields=["node", "-created"], name="benchrun_node_recent"),
            models.Index(fields=["state", "created"], name="benchrun_state"),
        ]

    def __str__(self) -> str:
        return f"benchmark {self.pk} of {self.node_id} {self.state}"


class BenchmarkResult(models.Model):
    """One workload of one run: its figures, the speedup against the baseline measured in the
    same run, whether it was correct, and the `sources` the node gave for each figure."""

    run = models.ForeignKey(BenchmarkRun, on_delete=models.CASCADE, related_name="results")
    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, related_name="+")
    workload = models.CharField(max_length=50)
    created = models.DateTimeField(help_text="When the run finished.")
    ops_per_second = models.FloatField(null=True, blank=True)
    ops_per_cycle = models.FloatField(null=True, blank=True)
    speedup = models.FloatField(
        null=True, blank=True, help_text="baseline seconds / ours, same run (>1: ours is faster)"
    )
    baseline = models.CharField(max_length=100, blank=True)
    correct = models.BooleanField(null=True, blank=True, help_text="null: no reference to check")
    error = models.TextField(blank=True)
    sources = models.JSONField(default=dict, blank=True)
    data = models.JSONField(default=dict, blank=True, help_text="The whole result, as sent.")

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [
            models.Index(fields=["node", "workload", "-created"], name="benchresult_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.workload} on {self.node_id} at {self.created:%Y-%m-%d %H:%M}"


class BenchmarkThreshold(models.Model):
    """Alert floors for one workload (docs/architecture.md, "Alerts"). Without a row, or with a
    field left empty, the settings' defaults apply: ops/cycle relative to the node's own first
    benchmarks (ops/cycle means different things for a GEMM and for a gather)."""

    workload = models.CharField(max_length=50, unique=True)
    ops_per_cycle_floor = models.FloatField(
        null=True, blank=True, help_text="Absolute floor; empty: relative to the node's first runs."
    )
    relative_floor = models.FloatField(
        null=True, blank=True, help_text="Share of the node's first runs' median (e.g. 0.8)."
    )
    slower_margin = models.FloatField(
        null=True,
        blank=True,
        help_text="Alert when the same-run speedup falls this share below"
        " its 7-day median (e.g. 0.10).",
    )

    def __str__(self) -> str:
        return self.workload


class AlertChannel(models.Model):
    """Where alerts go: an account's own channel (its nodes' alerts), or a staff channel
    (account empty: every node's alerts, fleet-wide)."""

    class Kind(models.TextChoices):
        EMAIL = "email"
        WEBHOOK = "webhook"

    account = models.ForeignKey(
        "accounts.Account",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="alert_channels",
        help_text="Empty: a staff channel that receives the whole fleet's alerts.",
    )
    kind = models.CharField(max_length=10, choices=Kind.choices)
    name = models.CharField(max_length=100)
    target = models.CharField(max_length=500, help_text="An e-mail address or an https URL.")
    secret = EncryptedTextField(blank=True, help_text="Webhook signing secret, encrypted at rest.")
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} → {self.target}"


class Alert(models.Model):
    """One occurrence of a rule's cause on one node: opened once, reminded while open, resolved
    when the cause clears. Closed alerts stay as history."""

    class Rule(models.TextChoices):
        NODE_DOWN = "node_down"
        OPS_PER_CYCLE_LOW = "ops_per_cycle_low"
        SLOWER_THAN_MEDIAN = "slower_than_median"
        INCORRECT_RESULT = "incorrect_result"
        AGENT_ERRORS = "agent_errors"

    class Severity(models.TextChoices):
        WARNING = "warning"
        CRITICAL = "critical"

    class State(models.TextChoices):
        OPEN = "open"
        RESOLVED = "resolved"

    node = models.ForeignKey("fleet.Node", on_delete=models.CASCADE, related_name="alerts")
    account = models.ForeignKey("accounts.Account", on_delete=models.CASCADE, related_name="+")
    rule = models.CharField(max_length=30, choices=Rule.choices)
    workload = models.CharField(max_length=50, blank=True)
    severity = models.CharField(max_length=10, choices=Severity.choices)
    state = models.CharField(max_length=10, choices=State.choices, default=State.OPEN)
    summary = models.TextField(help_text="The cause, in words.")
    details = models.JSONField(default=dict, blank=True)
    opened_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.TextField(blank=True)
    last_notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-opened_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["node", "rule", "workload"],
                condition=Q(state="open"),
                name="alert_open_once",
            )
        ]
        indexes = [models.Index(fields=["state", "rule"], name="alert_state_rule")]

    def __str__(self) -> str:
        return f"{self.rule} {self.workload} on {self.node_id}: {self.state}"


class Notification(models.Model):
    """One message about an alert to one channel, retried with exponential backoff for a day."""

    class Event(models.TextChoices):
        OPENED = "opened"
        REMINDER = "reminder"
        RESOLVED = "resolved"

    class State(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        FAILED = "failed"  # gave up after NOTIFY_RETRY_SECONDS

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="notifications")
    channel = models.ForeignKey(AlertChannel, on_delete=models.CASCADE, related_name="+")
    event = models.CharField(max_length=10, choices=Event.choices)
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    created = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["state", "next_attempt_at"], name="notification_due")]


class DeliveryAttempt(models.Model):
    notification = models.ForeignKey(
        Notification, on_delete=models.CASCADE, related_name="delivery_attempts"
    )
    at = models.DateTimeField(auto_now_add=True)
    ok = models.BooleanField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["at", "id"]
