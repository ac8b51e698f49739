"""Staff's view of the fleet. Secrets (SSH keys, node tokens) are write-only or hidden; state
changes go through the services, so every one is recorded (staff's own way out is the "force to
terminated" action, which asks for a reason)."""

from django import forms
from django.contrib import admin, messages
from django.template.response import TemplateResponse

from fleet.models import (
    Enrollment,
    Host,
    JobEvent,
    Node,
    NodeAction,
    NodeTransition,
    ProvisioningJob,
    TelemetrySample,
)
from fleet.services.errors import FleetError
from fleet.services.nodes import host_check


class HostForm(forms.ModelForm):
    ssh_private_key = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4, "placeholder": "(unchanged when left empty)"}),
        help_text="PEM text. Stored encrypted; never shown again. Leave empty to keep the key.",
    )

    class Meta:
        model = Host
        fields = "__all__"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.initial["ssh_private_key"] = ""

    def clean_ssh_private_key(self) -> str:
        new = self.cleaned_data.get("ssh_private_key", "")
        return new if new else (self.instance.ssh_private_key if self.instance.pk else "")

    def clean(self):
        data = super().clean()
        try:
            host_check(
                kind=data.get("kind", ""),
                address=data.get("address", ""),
                agent_host=data.get("agent_host", ""),
            )
        except FleetError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, exc.message)
        return data


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    form = HostForm
    list_display = ["name", "kind", "address", "ssh_user", "is_active", "capacity", "live_nodes"]
    list_filter = ["kind", "is_active"]
    search_fields = ["name", "address"]

    @admin.display(description="live nodes")
    def live_nodes(self, host: Host) -> int:
        return host.nodes.exclude(state="terminated").count()


class TransitionInline(admin.TabularInline):
    model = NodeTransition
    extra = 0
    can_delete = False
    readonly_fields = ["created", "from_state", "to_state", "cause"]
    fields = readonly_fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class JobInline(admin.TabularInline):
    model = ProvisioningJob
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ["kind", "state", "created", "started_at", "finished_at", "explanation"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "account",
        "kind",
        "state",
        "host",
        "agent_port",
        "scrape_approved",
        "last_heartbeat_at",
        "version",
        "created",
    ]
    list_filter = ["state", "kind", "host", "scrape_approved"]
    search_fields = ["name", "id", "account__name", "agent_url"]
    # State changes go through the services (so every one is recorded), never a form field.
    readonly_fields = [
        "id",
        "account",
        "requested_by",
        "kind",
        "host",
        "state",
        "delete_requested_at",
        "node_dir",
        "agent_port",
        "agent_url",
        "last_heartbeat_at",
        "last_seen_at",
        "last_telemetry",
        "version",
        "scrape_approved",
        "created",
        "updated",
    ]
    exclude = ["access_token", "access_token_sha256", "secret_sha256"]
    inlines = [TransitionInline, JobInline]
    actions = ["force_terminate", "approve_scraping"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Force to terminated (with a reason)")
    def force_terminate(self, request, queryset):
        """For a node whose machine is gone for good: ends it without running anything."""
        from fleet.services.nodes import node_force_terminate

        form = ForceTerminateForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            done = 0
            for node in queryset:
                try:
                    node_force_terminate(
                        node=node, reason=form.cleaned_data["reason"], by=request.user
                    )
                    done += 1
                except FleetError as exc:
                    self.message_user(request, f"{node}: {exc.message}", messages.WARNING)
            self.message_user(request, f"{done} node(s) forced to terminated.")
            return None
        return TemplateResponse(
            request,
            "admin/fleet/node/force_terminate.html",
            {
                **self.admin_site.each_context(request),
                "title": "Force nodes to terminated",
                "nodes": queryset,
                "form": form,
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
                "opts": self.model._meta,
            },
        )

    @admin.action(description="Approve scraping by Prometheus (enrolled nodes' addresses)")
    def approve_scraping(self, request, queryset):
        """After checking each node's agent address is the customer's machine, not ours: the
        Prometheus service discovery lists it until its agent reports another address."""
        from fleet.services.nodes import node_scrape_approve

        approved = []
        for node in queryset:
            if node_scrape_approve(node=node):
                approved.append(f"{node} at {node.agent_url}")
                # Who approved which address, in the node's admin history.
                self.log_change(request, node, f"Approved scraping of {node.agent_url}")
            else:
                self.message_user(
                    request,
                    f"{node}: nothing to approve (provisioned nodes are listed anyway; an "
                    "enrolled node must have reported its address)",
                    messages.WARNING,
                )
        if approved:
            self.message_user(request, "Prometheus may scrape: " + "; ".join(approved))


class ForceTerminateForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Recorded with the transition, e.g. 'customer's machine was wiped'.",
    )


class EventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    fields = ["counter", "created", "event", "host", "task", "failed", "changed", "stdout"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ProvisioningJob)
class ProvisioningJobAdmin(admin.ModelAdmin):
    list_display = ["id", "node", "kind", "state", "worker", "created", "started_at", "finished_at"]
    list_filter = ["state", "kind"]
    search_fields = ["node__name", "node__id", "node__account__name", "explanation"]
    readonly_fields = [
        f.name for f in ProvisioningJob._meta.fields if f.name not in ("cancel_requested",)
    ]
    inlines = [EventInline]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(NodeTransition)
class NodeTransitionAdmin(admin.ModelAdmin):
    list_display = ["created", "node", "from_state", "to_state", "cause"]
    list_filter = ["to_state", "from_state"]
    search_fields = ["node__name", "node__id", "cause"]
    readonly_fields = ["node", "from_state", "to_state", "cause", "created"]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(TelemetrySample)
class TelemetrySampleAdmin(admin.ModelAdmin):
    list_display = [
        "created",
        "node",
        "ops_per_cycle",
        "throughput_gops",
        "power_watts",
        "mops_per_watt",
        "cache_hit_rate",
    ]
    list_filter = ["node__state"]
    search_fields = ["node__name", "node__id"]
    readonly_fields = [f.name for f in TelemetrySample._meta.fields]


@admin.register(NodeAction)
class NodeActionAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "node",
        "kind",
        "created",
        "delivered_at",
        "deliveries",
        "completed_at",
        "ok",
    ]
    list_filter = ["kind", "ok"]
    search_fields = ["node__name", "node__id"]


@admin.register(Enrollment)
class EnrollmentAdmin(admin.ModelAdmin):
    list_display = ["id", "account", "created_by", "created", "expires_at", "used_at", "node"]
    list_filter = [("used_at", admin.EmptyFieldListFilter)]
    search_fields = ["account__name", "created_by__username"]
    exclude = ["secret_sha256"]
    readonly_fields = ["account", "created_by", "created", "used_at", "node"]

    def has_add_permission(self, request) -> bool:
        return False
