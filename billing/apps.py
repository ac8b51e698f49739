from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "billing"
    verbose_name = "Billing: plans, Stripe customers, Stripe events"

    def ready(self) -> None:
        # Event handlers register themselves by event type when their module is imported
        # (billing.handlers); later slices add their modules here.
        from billing import handlers  # noqa: F401
