"""The default plan: "vTPU node", $200 per provisioned node per month. Mirrored to Stripe by
`manage.py sync_plans` (a migration does not call Stripe)."""

from django.db import migrations


def create_default_plan(apps, schema_editor) -> None:
    Plan = apps.get_model("billing", "Plan")
    Plan.objects.get_or_create(
        name="vTPU node",
        defaults={"amount_cents": 20000, "currency": "usd", "interval": "month"},
    )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(create_default_plan, migrations.RunPython.noop)]
