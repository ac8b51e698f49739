"""manage.py sync_plans: make the default plan if it is missing, and mirror every plan to
Stripe when Stripe is configured (STRIPE_SECRET_KEY)."""

from django.core.management.base import BaseCommand

from billing.models import Plan
from billing.services import plan_default_ensure, plan_sync
from billing.stripe_client import stripe_configured


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options) -> None:
        plan_default_ensure()
        if not stripe_configured():
            self.stdout.write("Stripe is not configured (STRIPE_SECRET_KEY): plans not mirrored.")
            return
        for plan in Plan.objects.order_by("pk"):
            plan = plan_sync(plan=plan)
            self.stdout.write(
                f"{plan}: product {plan.stripe_product_id}, Stripe Plan {plan.stripe_plan_id}"
            )
