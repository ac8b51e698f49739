from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from accounts.models import Account, ApiToken, Invitation, Membership, User


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    """Staff raise an account's node quota here, or disable an account."""

    list_display = ["name", "node_quota", "is_active", "live_nodes", "created"]
    list_filter = ["is_active"]
    search_fields = ["name", "memberships__user__username", "memberships__user__email"]
    inlines = [MembershipInline]

    @admin.display(description="live nodes")
    def live_nodes(self, account: Account) -> int:
        return account.nodes.exclude(state="terminated").count()


@admin.register(User)
class VtpuUserAdmin(UserAdmin):
    list_display = ["username", "email", "account", "is_staff", "is_active", "last_login"]

    @admin.display(description="account")
    def account(self, user: User) -> str:
        membership = getattr(user, "membership", None)
        return str(membership.account) if membership else "—"


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are created by customers through the API; staff see and revoke, never the secret
    (only its hash is stored, and even that stays out of the page)."""

    list_display = ["name", "account", "user", "prefix", "created", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "created"]
    search_fields = ["name", "prefix", "account__name", "user__username", "user__email"]
    readonly_fields = ["account", "user", "name", "prefix", "created", "last_used_at"]
    fields = ["account", "user", "name", "prefix", "created", "last_used_at", "revoked_at"]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """Owners' invitations (the link's secret is only a hash here): staff see who was invited and
    whether they joined, and can withdraw an open one by deleting it."""

    list_display = ["email", "account", "invited_by", "created", "expires_at", "accepted_at"]
    search_fields = ["email", "account__name"]
    readonly_fields = [f.name for f in Invitation._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
