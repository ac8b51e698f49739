"""Celery tasks: thin. Each takes ids, calls one service, and declares its retries and limits.

Two queues (docs/architecture.md, "Queues"): `provisioning` for Ansible jobs (minutes each) and
`housekeeping` for the sweeps (seconds), served by separate workers so two long playbooks never
starve the sweeps. Job tasks are acks_late + reject_on_worker_lost: when a worker dies mid-run
the broker delivers the task again, and the service turns that redelivery into a failed job
(never a second playbook run). Only transient database/connection errors are retried.
"""

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from fleet.services import jobs, sweeps

PROVISIONING_QUEUE = "provisioning"
HOUSEKEEPING_QUEUE = "housekeeping"
TRANSIENT_ERRORS = (OperationalError, InterfaceError, ConnectionError)
# Routed by name in settings (CELERY_TASK_ROUTES): run_job to PROVISIONING_QUEUE, the rest to
# HOUSEKEEPING_QUEUE.
JOB_TASK_OPTIONS = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "soft_time_limit": settings.PROVISIONING_TASK_SOFT_TIME_LIMIT,
    "time_limit": settings.PROVISIONING_TASK_TIME_LIMIT,
    "autoretry_for": TRANSIENT_ERRORS,
    "retry_backoff": True,
    "max_retries": 5,
}
SWEEP_OPTIONS = {
    "acks_late": True,
    "soft_time_limit": 120,
    "time_limit": 180,
}


@shared_task(name="fleet.tasks.run_job", **JOB_TASK_OPTIONS)
def run_job(job_id: int) -> None:
    jobs.job_run(job_id=job_id)


@shared_task(name="fleet.tasks.poll_nodes", **SWEEP_OPTIONS)
def poll_nodes() -> int:
    return sweeps.poll_nodes()


@shared_task(name="fleet.tasks.mark_silent_nodes", **SWEEP_OPTIONS)
def mark_silent_nodes() -> int:
    return sweeps.mark_silent_nodes()


@shared_task(name="fleet.tasks.fail_orphaned_jobs", **SWEEP_OPTIONS)
def fail_orphaned_jobs() -> int:
    return sweeps.fail_orphaned_jobs()


@shared_task(name="fleet.tasks.requeue_pending_jobs", **SWEEP_OPTIONS)
def requeue_pending_jobs() -> int:
    return sweeps.requeue_pending_jobs()


@shared_task(name="fleet.tasks.repair_dead_agents", **SWEEP_OPTIONS)
def repair_dead_agents() -> int:
    return sweeps.repair_dead_agents()


@shared_task(name="fleet.tasks.terminate_vanished_enrolled_nodes", **SWEEP_OPTIONS)
def terminate_vanished_enrolled_nodes() -> int:
    return sweeps.terminate_vanished_enrolled_nodes()


@shared_task(name="fleet.tasks.prune_history", **SWEEP_OPTIONS)
def prune_history() -> dict:
    return sweeps.prune_history()
