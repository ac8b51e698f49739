"""Celery tasks: thin. Each loads nothing itself and calls one service.

Provisioning tasks are acks_late + reject_on_worker_lost: when a worker dies mid-run the broker
delivers the task again, and the service turns that redelivery into a failed job (never a second
playbook run). Only transient database/connection errors are retried automatically.
"""

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from fleet import services

TRANSIENT_ERRORS = (OperationalError, InterfaceError, ConnectionError)
# Above the runner's own job timeout, so the runner ends a slow job first and records why.
JOB_SOFT_LIMIT = settings.PROVISIONING_JOB_TIMEOUT + 120
JOB_HARD_LIMIT = settings.PROVISIONING_JOB_TIMEOUT + 180
JOB_TASK_OPTIONS = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "soft_time_limit": JOB_SOFT_LIMIT,
    "time_limit": JOB_HARD_LIMIT,
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": True,
    "max_retries": 5,
}
SWEEP_OPTIONS = {"acks_late": True, "soft_time_limit": 120, "time_limit": 180}


@shared_task(name="fleet.tasks.provision_node", **JOB_TASK_OPTIONS)
def provision_node(job_id: int) -> None:
    services.node_provision(job_id=job_id)


@shared_task(name="fleet.tasks.deprovision_node", **JOB_TASK_OPTIONS)
def deprovision_node(job_id: int) -> None:
    services.node_deprovision_run(job_id=job_id)


@shared_task(name="fleet.tasks.poll_nodes", **SWEEP_OPTIONS)
def poll_nodes() -> int:
    return services.poll_nodes()


@shared_task(name="fleet.tasks.mark_silent_nodes", **SWEEP_OPTIONS)
def mark_silent_nodes() -> int:
    return services.mark_silent_nodes()


@shared_task(name="fleet.tasks.fail_orphaned_jobs", **SWEEP_OPTIONS)
def fail_orphaned_jobs() -> int:
    return services.fail_orphaned_jobs()
