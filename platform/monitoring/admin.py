import secrets

from django.contrib import admin, messages

from controlplane.errors import ServiceError
from monitoring.benchmarks import benchmark_request
from monitoring.models import (
    Alert,
    AlertChannel,
    BenchmarkResult,
    BenchmarkRun,
    BenchmarkThreshold,
    MaintenanceWindow,
    Notification,
    SlaCredit,
)


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(admin.ModelAdmin):
    """Staff plan maintenance here: per node, per host, or (neither) the whole fleet."""

    list_display = ["starts_at", "ends_at", "node", "host", "reason", "created_by"]
    list_filter = ["host"]
    search_fields = ["reason", "node__name", "host__name"]
    raw_id_fields = ["node"]
    readonly_fields = ["created_by", "created"]

    def save_model(self, request, obj, form, change) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(SlaCredit)
class SlaCreditAdmin(admin.ModelAdmin):
    list_display = ["month", "node", "account", "uptime_ratio", "down_seconds", "credit_percent"]
    list_filter = ["month"]
    search_fields = ["node__name", "account__name"]
    readonly_fields = [f.name for f in SlaCredit._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


class NotificationInline(admin.TabularInline):
    model = Notification
    extra = 0
    fields = ["channel", "event", "state", "attempts", "sent_at", "next_attempt_at", "last_error"]
    readonly_fields = fields
    can_delete = False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Alert history; open ones first when filtered. Rules open and resolve them, not staff."""

    list_display = ["opened_at", "state", "severity", "rule", "workload", "node", "summary"]
    list_filter = ["state", "severity", "rule"]
    search_fields = ["summary", "node__name", "workload"]
    readonly_fields = [f.name for f in Alert._meta.fields]
    inlines = [NotificationInline]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(AlertChannel)
class AlertChannelAdmin(admin.ModelAdmin):
    """Channels with no account are staff's: they receive every node's alerts, fleet-wide."""

    list_display = ["name", "kind", "target", "account", "enabled"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "target", "account__name"]
    exclude = ["secret"]

    def save_model(self, request, obj, form, change) -> None:
        if obj.kind == AlertChannel.Kind.WEBHOOK and not obj.secret:
            obj.secret = secrets.token_urlsafe(32)
            messages.info(request, f"Signing secret of {obj.name} (shown once): {obj.secret}")
        super().save_model(request, obj, form, change)


# ---- continuous benchmarks (docs/architecture.md, "Continuous benchmarks") ------------------


class BenchmarkResultInline(admin.TabularInline):
    model = BenchmarkResult
    extra = 0
    fields = ["workload", "ops_per_second", "ops_per_cycle", "speedup", "baseline", "correct",
              "error", "sources"]  # fmt: skip
    readonly_fields = fields
    can_delete = False
    ordering = ["id"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(BenchmarkRun)
class BenchmarkRunAdmin(admin.ModelAdmin):
    """Every benchmark of every node: scheduled, asked for, skipped (with why) or failed."""

    list_display = ["id", "node", "trigger", "state", "size", "created", "finished_at", "reason"]
    list_filter = ["state", "trigger", "size"]
    search_fields = ["node__name", "=node__id", "reason"]
    list_select_related = ["node"]
    readonly_fields = [f.name for f in BenchmarkRun._meta.fields]
    inlines = [BenchmarkResultInline]
    actions = ["benchmark_again"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Benchmark these runs' nodes again now")
    def benchmark_again(self, request, queryset) -> None:
        for node in {run.node for run in queryset.select_related("node")}:
            try:
                run = benchmark_request(node=node, by=request.user)
            except ServiceError as exc:
                self.message_user(request, exc.message, messages.WARNING)
            else:
                self.message_user(request, f"{node}: benchmark run {run.pk} asked for.")


@admin.register(BenchmarkThreshold)
class BenchmarkThresholdAdmin(admin.ModelAdmin):
    """Per-workload alert floors; an empty field falls back to the settings' default."""

    list_display = ["workload", "ops_per_cycle_floor", "relative_floor", "slower_margin"]
    search_fields = ["workload"]
