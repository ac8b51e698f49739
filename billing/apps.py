from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "billing"
    verbose_name = "Billing: plans, subscriptions, invoices, Stripe events, economics"

    def ready(self) -> None:
        # Event handlers register themselves by event type when their module is imported.
        from billing import handlers  # noqa: F401
        from billing.signals import connect

        connect()
