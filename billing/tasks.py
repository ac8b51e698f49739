"""Celery tasks of billing: thin, on the housekeeping queue (the default route)."""

from celery import shared_task
from django.utils import timezone

from accounts.models import Account
from billing import credits, dunning, reconciliation, services, subscriptions
from billing.models import Plan


@shared_task(name=services.PROCESS_EVENT_TASK, acks_late=True, soft_time_limit=60)
def process_stripe_event(event_pk: int) -> str:
    """One attempt at one verified Stripe event (a failure is recorded; the sweep retries)."""
    return services.event_process(event_pk=event_pk)


@shared_task(name="billing.tasks.retry_stripe_events", acks_late=True, soft_time_limit=60)
def retry_stripe_events() -> int:
    """Events whose processing failed and is due again, or whose task was lost."""
    return services.events_retry_due(now=timezone.now())


@shared_task(
    name=subscriptions.SYNC_TASK,
    acks_late=True,
    soft_time_limit=60,
    autoretry_for=(Exception,),
    retry_backoff=True,
    max_retries=5,
)
def sync_subscription(account_id: int, plan_id: int) -> str:
    """The quantity of an account's subscription for a plan follows its nodes (reconciliation
    repairs it if every retry failed)."""
    account = Account.objects.get(pk=account_id)
    plan = Plan.objects.get(pk=plan_id)
    invoice = subscriptions.subscription_sync(account=account, plan=plan)
    if invoice is not None:
        subscriptions.invoice_apply(invoice)
    return f"account {account_id}, plan {plan_id}: synced"


@shared_task(name="billing.tasks.reconcile", acks_late=True, soft_time_limit=240)
def reconcile() -> dict:
    return reconciliation.reconcile().as_dict()


@shared_task(name="billing.tasks.dunning", acks_late=True, soft_time_limit=60)
def dunning_sweep() -> dict:
    return dunning.dunning_sweep(now=timezone.now())


@shared_task(name="billing.tasks.apply_sla_credits", acks_late=True, soft_time_limit=120)
def apply_sla_credits() -> dict:
    return credits.sla_credits_apply()
