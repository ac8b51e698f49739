"""The periodic work of Celery beat (schedules: controlplane.schedules): nothing stuck, nothing
silent, nothing kept for ever. Each sweep claims what it acts on atomically, so two beats, a
heartbeat and a worker never act twice on the same row."""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from fleet.models import (
    ACTIVE_JOB_STATES,
    JobEvent,
    JobState,
    Node,
    NodeState,
    NodeTransition,
    ProvisioningJob,
    TelemetrySample,
)
from fleet.services import agents, queue
from fleet.services.jobs import fail_running_job, job_recover_interrupted, pid_alive
from fleet.services.transitions import try_transition

log = logging.getLogger(__name__)
S = NodeState

# A pending job whose task was sent this long ago and never claimed is sent again (a broker
# restarted without persistence loses its messages).
REQUEUE_UNCLAIMED_SECONDS = 120
# A pending job never sent (the broker was down when it was requested) waits this long first,
# so the sweep does not race the request's own on-commit send.
REQUEUE_UNSENT_SECONDS = 10
# Agents polled at once by poll_nodes (each call waits at most agents.HTTP_TIMEOUT_SECONDS).
POLL_CONCURRENCY = 16


def fail_orphaned_jobs() -> int:
    """Fail running jobs nobody runs any more: on this machine, a job whose worker process is
    gone; anywhere, one with no event for longer than the runner's own idle timeout (+60 s) or
    older than its job timeout (+120 s). A leftover ansible-playbook here is stopped."""
    now = timezone.now()
    idle_cutoff = now - timedelta(seconds=settings.PROVISIONING_IDLE_TIMEOUT + 60)
    total_cutoff = now - timedelta(seconds=settings.PROVISIONING_JOB_TIMEOUT + 120)
    here = socket.gethostname()
    failed = 0
    for job in ProvisioningJob.objects.filter(state=JobState.RUNNING).select_related("node"):
        last = job.last_event_at or job.started_at or job.created
        started = job.started_at or job.created
        if job.worker == here and job.worker_pid and not pid_alive(job.worker_pid):
            job_recover_interrupted(job=job)  # stops its leftover Ansible, fails job and node
            failed += job.state == JobState.FAILED
            continue
        if last > idle_cutoff and started > total_cutoff:
            continue
        if job.worker == here and pid_alive(job.runner_pid):
            continue  # still working here; its runner enforces its own timeouts
        explanation = (
            f"No progress since {last:%H:%M:%S} UTC and its worker is gone; retry the node."
        )
        if fail_running_job(job, explanation, cause=f"job {job.pk}: {explanation}"):
            failed += 1
    return failed


def requeue_pending_jobs() -> int:
    """Send again the tasks of pending jobs that never reached a worker: requested while the
    broker was down, or lost by a broker restart. A job is claimed once by whichever worker
    gets it first, so a duplicate send runs nothing twice."""
    now = timezone.now()
    stale = Q(queued_at__isnull=True, created__lt=now - timedelta(seconds=REQUEUE_UNSENT_SECONDS))
    stale |= Q(queued_at__lt=now - timedelta(seconds=REQUEUE_UNCLAIMED_SECONDS))
    sent = 0
    for job in ProvisioningJob.objects.filter(stale, state=JobState.PENDING):
        if not ProvisioningJob.objects.filter(stale, pk=job.pk, state=JobState.PENDING).update(
            queued_at=now
        ):
            continue  # another sweep took it
        if queue.send_task(queue.JOB_TASK, job.pk):
            sent += 1
        else:
            ProvisioningJob.objects.filter(pk=job.pk).update(queued_at=None)
            break  # the broker is still down: the next sweep tries again
    return sent


def mark_silent_nodes() -> int:
    """Ready nodes with no sign of life for 3 heartbeats become degraded. The move happens only
    if the node is *still* silent when the row is updated, so a heartbeat landing between the
    read and the write wins."""
    silence = 3 * settings.HEARTBEAT_SECONDS
    cutoff = timezone.now() - timedelta(seconds=silence)
    still_silent = Q(last_seen_at__lt=cutoff) | Q(last_seen_at__isnull=True, updated__lt=cutoff)
    return sum(
        try_transition(node, S.DEGRADED, f"no heartbeat for {silence} s", only_if=still_silent)
        for node in Node.objects.filter(still_silent, state=S.READY)
    )


def poll_nodes() -> int:
    """Health-check and poll the nodes we can reach (provisioned on our hosts); enrolled ones
    report by heartbeat, since they may sit behind NAT.

    The calls to the agents run POLL_CONCURRENCY at a time, so a host that stopped answering
    costs its timeouts once, not once per node in turn; what they bring is written here, one
    node after another (the database is used from this thread only)."""
    nodes = list(
        Node.objects.filter(kind=Node.Kind.PROVISIONED, state__in=[S.READY, S.DEGRADED]).exclude(
            agent_url=""
        )
    )
    with ThreadPoolExecutor(max_workers=POLL_CONCURRENCY, thread_name_prefix="poll") as pool:
        fetched = pool.map(agents.poll_fetch, nodes)
        return sum(
            agents.poll_record(node, outcome) is not None
            for node, outcome in zip(nodes, fetched, strict=True)
        )


def repair_dead_agents() -> int:
    """A provisioned node degraded for REPAIR_AFTER_SECONDS whose agent still does not answer
    gets a repair job: the (idempotent) provisioning role again, which restarts its agent. At
    most one repair per node per REPAIR_AFTER_SECONDS."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.REPAIR_AFTER_SECONDS)
    queued = 0
    for node in Node.objects.filter(
        state=S.DEGRADED, kind=Node.Kind.PROVISIONED, delete_requested_at__isnull=True
    ):
        went_degraded = (
            NodeTransition.objects.filter(node=node, to_state=S.DEGRADED)
            .order_by("-created", "-id")
            .values_list("created", flat=True)
            .first()
        )
        if went_degraded is None or went_degraded > cutoff:
            continue
        if node.jobs.filter(
            Q(state__in=ACTIVE_JOB_STATES) | Q(kind=ProvisioningJob.Kind.REPAIR, created__gt=cutoff)
        ).exists():
            continue
        try:
            with transaction.atomic():
                job = ProvisioningJob.objects.create(node=node, kind=ProvisioningJob.Kind.REPAIR)
                queue.queue_job(job.pk)
        except IntegrityError:
            continue  # a job started meanwhile
        log.info("node %s degraded since %s: repair job %s", node, went_degraded, job.pk)
        queued += 1
    return queued


def terminate_vanished_enrolled_nodes() -> int:
    """An enrolled node deleted while its machine is gone never hears its 410: after
    ENROLLED_DELETE_GRACE_SECONDS it is terminated, with that cause."""
    grace = settings.ENROLLED_DELETE_GRACE_SECONDS
    cutoff = timezone.now() - timedelta(seconds=grace)
    vanished = Q(delete_requested_at__lt=cutoff)
    return sum(
        try_transition(
            node,
            S.TERMINATED,
            f"deleted {grace} s ago and its machine never called again; the agent there (if it"
            " ever returns) is refused",
            only_if=vanished,
        )
        for node in Node.objects.filter(vanished, kind=Node.Kind.ENROLLED, state=S.DEPROVISIONING)
    )


def prune_history() -> dict[str, int]:
    """Drop telemetry samples and job events past their retention (settings); transitions are
    kept (uptime and SLA are computed from them)."""
    now = timezone.now()
    samples, _ = TelemetrySample.objects.filter(
        created__lt=now - timedelta(days=settings.TELEMETRY_RETENTION_DAYS)
    ).delete()
    events, _ = JobEvent.objects.filter(
        created__lt=now - timedelta(days=settings.JOB_EVENT_RETENTION_DAYS)
    ).delete()
    return {"telemetry_samples": samples, "job_events": events}
