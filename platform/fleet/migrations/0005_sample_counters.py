"""The economics' counters as columns (issue 9); existing samples get them from their JSON, in
one statement on PostgreSQL (rows whose telemetry has no ops counter are left null)."""

from django.db import migrations, models

from fleet.services.agents import sample_counters

FILL_POSTGRESQL = """
UPDATE fleet_telemetrysample SET
  ops_total = CASE WHEN jsonb_typeof(data->'ops') = 'number' THEN
    CASE WHEN abs((data->>'ops')::numeric) <= 9223372036854775807
    THEN trunc((data->>'ops')::numeric)::bigint END END,
  uptime_seconds = CASE WHEN jsonb_typeof(data->'uptime_seconds') = 'number'
    THEN (data->>'uptime_seconds')::float8 END,
  energy_joules = CASE WHEN jsonb_typeof(data->'lifetime'->'energy_joules') = 'number'
    THEN (data->'lifetime'->>'energy_joules')::float8 END,
  energy_source = CASE WHEN jsonb_typeof(data->'sources'->'power_watts') = 'string'
    THEN data->'sources'->>'power_watts' END
WHERE jsonb_typeof(data->'ops') = 'number'
"""


def fill_counters(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FILL_POSTGRESQL)
        return
    samples = apps.get_model("fleet", "TelemetrySample")
    for row in samples.objects.exclude(data={}).iterator(2000):
        samples.objects.filter(pk=row.pk).update(**sample_counters(row.data))


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0004_node_plan"),
    ]

    operations = [
        migrations.AddField(
            model_name="telemetrysample",
            name="energy_joules",
            field=models.FloatField(
                blank=True,
                help_text="Cumulative energy (telemetry `lifetime.energy_joules`).",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="telemetrysample",
            name="energy_source",
            field=models.TextField(
                blank=True,
                help_text="Where the power figure came from (`sources.power_watts`).",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="telemetrysample",
            name="ops_total",
            field=models.BigIntegerField(
                blank=True, help_text="Cumulative runtime ops counter (telemetry `ops`).", null=True
            ),
        ),
        migrations.AddField(
            model_name="telemetrysample",
            name="uptime_seconds",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.RunPython(fill_counters, migrations.RunPython.noop),
    ]
