"""Celery tasks of monitoring: thin, on the housekeeping queue (by default routing)."""

from celery import shared_task
from django.utils import timezone

from monitoring import services
from monitoring.uptime import previous_month


@shared_task(name="monitoring.tasks.close_sla_month", acks_late=True, soft_time_limit=300)
def close_sla_month() -> int:
    """Close the month that ended last (daily; idempotent: a month is closed once per node)."""
    now = timezone.now()
    return services.sla_month_close(month=previous_month(now), now=now)


@shared_task(name="monitoring.tasks.evaluate_alerts", acks_late=True, soft_time_limit=60)
def evaluate_alerts() -> dict:
    """The periodic alert rules (node down, agent errors) and reminders."""
    from monitoring.alerts import alerts_evaluate

    return alerts_evaluate(now=timezone.now())


@shared_task(name="monitoring.tasks.deliver_notification", acks_late=True, soft_time_limit=60)
def deliver_notification(notification_id: int) -> str:
    """One attempt at one alert message (a failure is recorded and retried by the sweep)."""
    from monitoring.notify import notification_deliver

    return notification_deliver(notification_id)


@shared_task(name="monitoring.tasks.deliver_due_notifications", acks_late=True, soft_time_limit=60)
def deliver_due_notifications() -> int:
    """Messages whose first send was lost or whose retry is due."""
    from monitoring.notify import notifications_deliver_due

    return notifications_deliver_due(now=timezone.now())


@shared_task(name="monitoring.tasks.schedule_benchmarks", acks_late=True, soft_time_limit=50)
def schedule_benchmarks() -> dict:
    """Every minute: benchmarks for the nodes whose slot came, skips with their reason, and
    runs that never got a result failed (monitoring.benchmarks)."""
    from monitoring.benchmarks import benchmarks_schedule

    return benchmarks_schedule(now=timezone.now())


@shared_task(name="monitoring.tasks.prune_history", acks_late=True, soft_time_limit=300)
def prune_history() -> dict:
    """Benchmark history past its retention (BENCHMARK_RETENTION_DAYS)."""
    return services.history_prune(now=timezone.now())
