from django.contrib import admin

from monitoring.models import MaintenanceWindow, SlaCredit


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
