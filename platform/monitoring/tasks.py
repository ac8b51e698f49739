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
