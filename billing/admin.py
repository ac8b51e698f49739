"""Staff's view of billing: plans (editable; "mirror to Stripe" pushes them), the accounts'
Stripe customers and their standing, subscriptions, invoices, what each node's payment waits
for, SLA credits paid out, reconciliation's open issues (read-only: Stripe and the services
change them; "reconcile now" runs a reconciliation), every Stripe webhook request as received
(read-only, with "process again"), and the economics' assumptions (a change is a new row)."""

import stripe
from django.contrib import admin, messages

from billing.economics import ASSUMPTION_FIELDS, assumptions_current, assumptions_values
from billing.models import (
    BillingCustomer,
    EconomicAssumptions,
    Invoice,
    NodeCharge,
    Plan,
    ReconciliationIssue,
    SlaCreditApplied,
    StripeEvent,
    Subscription,
)
from billing.services import events_process_again, plan_sync
from controlplane.errors import ServiceError


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["name", "amount_cents", "currency", "interval", "node_kind", "active",
                    "stripe_plan_id", "synced_at"]  # fmt: skip
    list_filter = ["active", "node_kind"]
    search_fields = ["name", "stripe_product_id", "stripe_plan_id"]
    readonly_fields = ["stripe_product_id", "stripe_plan_id", "synced_at", "created"]
    actions = ["mirror_to_stripe"]

    @admin.action(description="Mirror to Stripe (a new price makes a new Stripe Plan)")
    def mirror_to_stripe(self, request, queryset) -> None:
        for plan in queryset:
            try:
                plan = plan_sync(plan=plan)
            except ServiceError as exc:  # Stripe is not configured
                self.message_user(request, exc.message, messages.WARNING)
                return
            except stripe.StripeError as exc:
                self.message_user(request, f"{plan}: Stripe refused: {exc}", messages.ERROR)
                continue
            self.message_user(request, f"{plan}: Stripe Plan {plan.stripe_plan_id}.")


@admin.register(BillingCustomer)
class BillingCustomerAdmin(admin.ModelAdmin):
    list_display = ["account", "stripe_customer_id", "standing", "past_due_since", "card_last4",
                    "cancel_requested_at"]  # fmt: skip
    list_filter = ["standing"]
    search_fields = ["account__name", "stripe_customer_id"]
    readonly_fields = [f.name for f in BillingCustomer._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(StripeEvent)
class StripeEventAdmin(admin.ModelAdmin):
    """Every request to the Stripe webhook: refused ones with why, events with what processing
    did or why it failed (failed ones are retried by a sweep)."""

    list_display = ["received_at", "stripe_id", "type", "state", "attempts", "processed_at",
                    "last_error"]  # fmt: skip
    list_filter = ["state", "type"]
    search_fields = ["=stripe_id", "type", "last_error"]
    readonly_fields = [f.name for f in StripeEvent._meta.fields]
    actions = ["process_again"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Process again", permissions=["view"])
    def process_again(self, request, queryset) -> None:
        queued = events_process_again(events=queryset)
        skipped = queryset.count() - queued
        self.message_user(
            request,
            f"{queued} event(s) queued again"
            + (f"; {skipped} refused request(s) have no event to process." if skipped else "."),
        )


@admin.register(EconomicAssumptions)
class EconomicAssumptionsAdmin(admin.ModelAdmin):
    """The economics' assumptions as history: the newest row is used; a change is a new row
    (prefilled with the current values) that records who made it, so old rows stay as they were.
    The staff API (PUT /api/v1/economics/assumptions) does the same."""

    list_display = ["updated", "updated_by", *ASSUMPTION_FIELDS]
    readonly_fields = ["updated", "updated_by"]

    def get_changeform_initial_data(self, request) -> dict:
        return assumptions_values(assumptions_current())

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change) -> None:
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)


class ReadOnly(admin.ModelAdmin):
    """Mirrors of Stripe and records of what billing did: changed by Stripe and the services,
    never by hand."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnly):
    list_display = ["stripe_subscription_id", "account", "plan", "status", "quantity",
                    "current_period_end", "cancel_at_period_end"]  # fmt: skip
    list_filter = ["status", "plan"]
    search_fields = ["=stripe_subscription_id", "account__name"]


@admin.register(Invoice)
class InvoiceAdmin(ReadOnly):
    list_display = ["stripe_invoice_id", "account", "status", "total_cents", "amount_paid_cents",
                    "payment_status", "stripe_created", "paid_at"]  # fmt: skip
    list_filter = ["status", "payment_status"]
    search_fields = ["=stripe_invoice_id", "account__name", "payment_intent_id"]


@admin.register(NodeCharge)
class NodeChargeAdmin(ReadOnly):
    list_display = ["node", "plan", "state", "stripe_invoice_id", "created", "paid_at"]
    list_filter = ["state", "plan"]
    search_fields = ["=stripe_invoice_id", "node__name"]


@admin.register(SlaCreditApplied)
class SlaCreditAppliedAdmin(ReadOnly):
    list_display = ["credit", "amount_cents", "currency", "stripe_invoice_item_id", "created"]


@admin.register(ReconciliationIssue)
class ReconciliationIssueAdmin(ReadOnly):
    """What reconciliation found and could not repair; resolved when a later run no longer
    finds it."""

    list_display = ["kind", "key", "account", "detail", "first_seen", "last_seen", "resolved_at"]
    list_filter = ["kind", ("resolved_at", admin.EmptyFieldListFilter)]
    search_fields = ["key", "detail"]
    actions = ["reconcile_now"]

    @admin.action(description="Reconcile with Stripe now")
    def reconcile_now(self, request, queryset) -> None:
        from billing.reconciliation import reconcile

        try:
            report = reconcile()
        except (ServiceError, stripe.StripeError) as exc:
            self.message_user(request, f"Reconciliation failed: {exc}", messages.ERROR)
            return
        self.message_user(
            request,
            f"{len(report.repaired)} repaired, {len(report.issues)} mismatch(es) open.",
        )
