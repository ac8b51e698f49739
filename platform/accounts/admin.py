from django.contrib import admin

from accounts.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are created by customers through the API; staff see and revoke, never the secret
    (only its hash is stored, and even that stays out of the page)."""

    list_display = ["name", "user", "prefix", "created", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "created"]
    search_fields = ["name", "prefix", "user__username", "user__email"]
    readonly_fields = ["user", "name", "prefix", "created", "last_used_at"]
    fields = ["user", "name", "prefix", "created", "last_used_at", "revoked_at"]

    def has_add_permission(self, request) -> bool:
        return False
