from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "monitoring"
    verbose_name = "Monitoring: uptime, maintenance, SLA"

    def ready(self) -> None:
        # Fleet's services never import monitoring: monitoring follows them through signals.
        from fleet.signals import action_completed
        from monitoring.benchmarks import on_action_completed

        action_completed.connect(on_action_completed, dispatch_uid="monitoring.benchmarks")
        # The alert rules follow each recorded benchmark (docs/architecture.md, "Alerts").
        from monitoring.alerts import on_benchmark_recorded
        from monitoring.signals import benchmark_recorded

        benchmark_recorded.connect(on_benchmark_recorded, dispatch_uid="monitoring.alerts")
