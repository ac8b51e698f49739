from django.apps import AppConfig


class FleetConfig(AppConfig):
    """Hosts, nodes, their state machine, provisioning jobs and telemetry."""

    name = "fleet"
    default_auto_field = "django.db.models.BigAutoField"
