"""Sending Celery tasks by name, after the transaction that made their work commits.

Services never import fleet.tasks (no import cycle; docs/architecture.md, "Queues"). A broker
that is down when a request commits must not turn that request into a 500 after its rows are
written: the send is logged and given up, and the job stays `pending` with `queued_at` unset, so
the `requeue_pending_jobs` sweep sends it again once the broker is back.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

log = logging.getLogger(__name__)

# Tasks and the queue each goes to (controlplane.celery routes by these names too).
JOB_TASK = "fleet.tasks.run_job"
# How long a send may try to reach the broker before giving up (the request is waiting).
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2}


def send_task(name: str, *args: object, **options: object) -> bool:
    """Send now; False (logged) when the broker cannot be reached."""
    from controlplane.celery import app

    try:
        app.send_task(name, args=args, retry=True, retry_policy=PUBLISH_RETRY_POLICY, **options)
    except Exception as exc:  # kombu/redis raise many kinds; none may fail the caller
        log.warning("could not send %s%r to the broker (%s); a sweep will retry", name, args, exc)
        return False
    return True


def queue_job(job_id: int) -> None:
    """Run job `job_id` once the current transaction commits."""

    def send() -> None:
        from fleet.models import ProvisioningJob

        if send_task(JOB_TASK, job_id):
            ProvisioningJob.objects.filter(pk=job_id).update(queued_at=timezone.now())

    transaction.on_commit(send)
