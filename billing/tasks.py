"""Celery tasks of billing: thin, on the housekeeping queue (the default route)."""

from celery import shared_task
from django.utils import timezone

from billing import services


@shared_task(name=services.PROCESS_EVENT_TASK, acks_late=True, soft_time_limit=60)
def process_stripe_event(event_pk: int) -> str:
    """One attempt at one verified Stripe event (a failure is recorded; the sweep retries)."""
    return services.event_process(event_pk=event_pk)


@shared_task(name="billing.tasks.retry_stripe_events", acks_late=True, soft_time_limit=60)
def retry_stripe_events() -> int:
    """Events whose processing failed and is due again, or whose task was lost."""
    return services.events_retry_due(now=timezone.now())
