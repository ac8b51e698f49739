"""Provisioning jobs (AWX's jobs, in small): claim, run the playbook through ansible-runner,
record the outcome once, cancel, and recover from a worker that died.

The long-running steps are not one transaction: each write commits on its own, so the portal
sees a job's events while Ansible runs. A job always ends with a recorded state: a crash or a
timeout is `failed` with an explanation, and the final write survives a transient database
error (it is retried here), so a successful run is never reported as "the worker died".
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from fleet.models import (
    ACTIVE_JOB_STATES,
    Host,
    JobEvent,
    JobState,
    Node,
    NodeState,
    ProvisioningJob,
)
from fleet.services import agents
from fleet.services.credentials import new_secret
from fleet.services.errors import Conflict
from fleet.services.transitions import try_transition

log = logging.getLogger(__name__)
S = NodeState

CANCEL_POLL_SECONDS = 2.0  # how often a running job re-reads cancel_requested
HEALTH_WAIT_SECONDS = 20.0  # how long a finished provision waits for the agent to answer
KILL_GRACE_SECONDS = 5.0
# The final write of a job is retried on a transient database error for about this long.
FINISH_RETRY_DELAYS = (0.5, 1, 2, 4, 8)
WORKER_DIED = "The worker running this job died; retry the node."
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
PROVISIONING_KINDS = (ProvisioningJob.Kind.PROVISION, ProvisioningJob.Kind.REPAIR)


@dataclass(frozen=True)
class Outcome:
    """What a job ended with, whether from the runner or from a crash around it."""

    status: str
    rc: int | None
    explanation: str
    stdout: str


def _runner() -> Any:
    """provisioning.runner, imported late: the web process never needs Ansible's imports, and
    tests replace this function to run without Ansible."""
    from provisioning import runner

    return runner


def _claim_job(job_id: int) -> bool:
    return (
        ProvisioningJob.objects.filter(pk=job_id, state=JobState.PENDING).update(
            state=JobState.RUNNING,
            started_at=timezone.now(),
            worker=socket.gethostname(),
            worker_pid=os.getpid(),
        )
        == 1
    )


def _finish_job(job: ProvisioningJob, outcome: Outcome) -> bool:
    """Record the final state once; False when a sweep or recovery already ended the job.

    A transient database error (a restarted server, a dropped connection) is retried with a
    fresh connection for about 15 s before it is allowed to escape."""
    status = outcome.status if outcome.status in JobState.values else JobState.FAILED
    fields = {
        "state": status,
        "rc": outcome.rc,
        "explanation": outcome.explanation,
        "finished_at": timezone.now(),
    }
    if outcome.stdout:
        fields["stdout"] = outcome.stdout
    for attempt, delay in enumerate((*FINISH_RETRY_DELAYS, None)):
        try:
            done = (
                ProvisioningJob.objects.filter(pk=job.pk, state=JobState.RUNNING).update(**fields)
                == 1
            )
            job.refresh_from_db()
            return done
        except TRANSIENT_DB_ERRORS as exc:
            if delay is None or connection.in_atomic_block:
                raise
            log.warning("job %s: final write failed (%s); retry %d", job.pk, exc, attempt + 1)
            time.sleep(delay)
            connection.close()  # the next query opens a new connection
            close_old_connections()
    raise AssertionError("unreachable")


def _event_time(raw: Any) -> datetime:
    parsed = parse_datetime(raw) if isinstance(raw, str) else None
    if parsed is None:
        return timezone.now()
    return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)


def store_job_events(*, job_id: int, events: list[dict]) -> int:
    """Store a batch of Ansible events; a counter already stored is skipped (redelivery)."""
    rows = []
    for event in events:
        try:
            counter = int(event["counter"])
        except (KeyError, TypeError, ValueError):
            log.warning("job %s: an event without a counter was dropped", job_id)
            continue
        rows.append(
            JobEvent(
                job_id=job_id,
                counter=counter,
                event=str(event.get("event") or "")[:100],
                host=str(event.get("host") or "")[:255],
                task=str(event.get("task") or "")[:500],
                stdout=str(event.get("stdout") or ""),
                failed=bool(event.get("failed")),
                changed=bool(event.get("changed")),
                created=_event_time(event.get("created")),
            )
        )
    if rows:
        JobEvent.objects.bulk_create(rows, ignore_conflicts=True)
        ProvisioningJob.objects.filter(pk=job_id).update(last_event_at=timezone.now())
    return len(rows)


def _cancel_reader(job_id: int) -> Callable[[], bool]:
    """cancelled() for the runner: reads the database at most every CANCEL_POLL_SECONDS."""
    last = {"at": -math.inf, "value": False}

    def cancelled() -> bool:
        now = time.monotonic()
        if not last["value"] and now - last["at"] >= CANCEL_POLL_SECONDS:
            last["at"] = now
            last["value"] = ProvisioningJob.objects.filter(
                pk=job_id, cancel_requested=True
            ).exists()
        return bool(last["value"])

    return cancelled


def pid_alive(pid: int | None) -> bool:
    """Whether `pid` runs on this machine (a zombie counts as dead)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def kill_process_group(pid: int) -> None:
    """Stop a leftover ansible-playbook and its children (pexpect makes it a session leader)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return

    def send(sig: int) -> None:
        try:
            if pgid == os.getpgid(0):  # never our own group
                os.kill(pid, sig)
            else:
                os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        send(signal.SIGKILL)


def _run_claimed(job: ProvisioningJob, build_spec: Callable[[ProvisioningJob], Any]) -> Outcome:
    """Run the playbook of a claimed job; whatever happens, return an Outcome (never raise)."""

    def on_start(pid: int) -> None:
        ProvisioningJob.objects.filter(pk=job.pk).update(runner_pid=pid)

    try:
        runner = _runner()
        result = runner.run_job(
            build_spec(job),
            on_events=lambda batch: store_job_events(job_id=job.pk, events=batch),
            cancelled=_cancel_reader(job.pk),
            on_start=on_start,
        )
        return Outcome(result.status, result.rc, result.explanation, result.stdout)
    except BaseException as exc:  # noqa: BLE001 - a job must end with a recorded state
        log.exception("job %s crashed", job.pk)
        leftover = ProvisioningJob.objects.filter(pk=job.pk).values_list("runner_pid", flat=True)
        if leftover and pid_alive(leftover[0]):
            kill_process_group(leftover[0])
        outcome = Outcome(
            JobState.FAILED,
            None,
            f"The provisioning task crashed ({type(exc).__name__}: {exc}). Retry the node; if it"
            " fails again, staff can read the worker's log.",
            "",
        )
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: record, then go
            _finish_job(job, outcome)
            raise
        return outcome


# ---- what each kind of job runs -------------------------------------------------------------


def _provision_spec(job: ProvisioningJob) -> Any:
    """provision.yml with a fresh node secret: only its hash is kept here, and the role hands
    the secret to the agent (docs/architecture.md, "Credentials")."""
    from fleet.wheel import node_wheel_path

    runner = _runner()
    node, host = job.node, job.node.host
    secret, secret_hash = new_secret()
    Node.objects.filter(pk=node.pk).update(secret_sha256=secret_hash)
    return runner.JobSpec(
        playbook="provision.yml",
        target=_target(runner, node, host),
        extravars={
            "node_id": str(node.pk),
            "node_dir": node.node_dir,
            "agent_host": host.agent_host,
            "agent_port": node.agent_port,
            "wheel_path": str(node_wheel_path()),
            "node_secret": secret,
            "access_token_sha256": node.access_token_sha256,
            "control_plane_url": settings.PUBLIC_URL,
            "heartbeat_seconds": settings.HEARTBEAT_SECONDS,
            "tdp_watts": float(host.tdp_watts),
            "vtpu_models": list(settings.NODE_MODELS),  # installed and preloaded
        },
        secret_vars=frozenset({"node_secret"}),
        job_timeout=settings.PROVISIONING_JOB_TIMEOUT,
        idle_timeout=settings.PROVISIONING_IDLE_TIMEOUT,
    )


def _deprovision_spec(job: ProvisioningJob) -> Any:
    runner = _runner()
    node = job.node
    return runner.JobSpec(
        playbook="deprovision.yml",
        target=_target(runner, node, node.host),
        extravars={
            "node_id": str(node.pk),
            "node_dir": node.node_dir,
            "agent_port": node.agent_port,
        },
        secret_vars=frozenset(),
        job_timeout=settings.PROVISIONING_JOB_TIMEOUT,
        idle_timeout=settings.PROVISIONING_IDLE_TIMEOUT,
    )


def _target(runner: Any, node: Node, host: Host) -> Any:
    if host.kind == Host.Kind.LOCAL:
        return runner.Target(
            name=f"node-{str(node.pk)[:8]}", connection="local", python=host.python
        )
    return runner.Target(
        name=f"node-{str(node.pk)[:8]}",
        connection="ssh",
        address=host.address,
        port=host.ssh_port,
        user=host.ssh_user or None,
        private_key=host.ssh_private_key or None,
        known_hosts=host.ssh_known_hosts or None,
        python=host.python,
    )


def _load_job(job_id: int) -> ProvisioningJob | None:
    job = ProvisioningJob.objects.select_related("node", "node__host").filter(pk=job_id).first()
    if job is None:
        log.warning("job %s does not exist (deleted?); nothing to do", job_id)
    return job


def job_run(*, job_id: int) -> ProvisioningJob | None:
    """Run job `job_id` once, whatever its kind: claim it, run its playbook, record the outcome
    and move the node.

    A job found `running` means its task was delivered again after its worker died: the job is
    failed (never run a second time on its own; a person decides to retry)."""
    if not _claim_job(job_id):
        job = _load_job(job_id)
        if job is not None and job.state == JobState.RUNNING:
            return job_recover_interrupted(job=job)
        if job is not None:
            log.info("job %s is already %s; nothing to do", job_id, job.state)
        return job
    job = _load_job(job_id)
    if job.kind == ProvisioningJob.Kind.DEPROVISION:
        return _deprovision(job)
    return _provision(job)


def _provision(job: ProvisioningJob) -> ProvisioningJob:
    node = job.node
    repair = job.kind == ProvisioningJob.Kind.REPAIR
    if not repair and node.state in (S.REQUESTED, S.FAILED):
        try_transition(node, S.PROVISIONING, f"provisioning job {job.pk} started")
    wanted = (S.DEGRADED, S.READY) if repair else (S.PROVISIONING,)
    if node.state not in wanted:
        _finish_job(
            job,
            Outcome(JobState.FAILED, None, f"The node is {node.state}; nothing to {job.kind}.", ""),
        )
        return job
    outcome = _run_claimed(job, _provision_spec)
    if not _finish_job(job, outcome):
        log.warning("job %s had already been ended (%s) by a sweep", job.pk, job.state)
        return job
    node.refresh_from_db()
    if job.state == JobState.SUCCESSFUL:
        if node.state in (S.PROVISIONING, S.DEGRADED) and agents.agent_healthy(
            node, wait=HEALTH_WAIT_SECONDS
        ):
            Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now())
            try_transition(node, S.READY, f"{job.kind} job {job.pk} succeeded; the agent answers")
        # otherwise the first heartbeat makes it ready (an agent we cannot reach, e.g. NAT)
        return job
    reason = job.explanation or f"{job.kind} job {job.pk} {job.state}"
    if repair:
        return job  # still degraded; the job and its reason are on record
    # A heartbeat may have made it ready while the playbook's last steps still ran; a failed
    # provisioning still fails the node, in one recorded move, whatever it was meanwhile.
    try_transition(
        node,
        S.FAILED,
        f"provisioning job {job.pk} {job.state}: {reason}",
        from_states=(S.PROVISIONING, S.READY, S.DEGRADED),
    )
    return job


def _deprovision(job: ProvisioningJob) -> ProvisioningJob:
    """Success terminates the node; a failure fails it (visible, with the reason), and deleting
    it again or retrying it starts a new deprovisioning job."""
    outcome = _run_claimed(job, _deprovision_spec)
    if not _finish_job(job, outcome):
        return job
    if job.state == JobState.SUCCESSFUL:
        try_transition(job.node, S.TERMINATED, f"deprovisioning job {job.pk} succeeded")
    else:
        reason = job.explanation or f"deprovisioning job {job.pk} {job.state}"
        try_transition(
            job.node,
            S.FAILED,
            f"deprovisioning job {job.pk} {job.state}: {reason} (delete the node again to retry)",
            from_states=(S.DEPROVISIONING,),
        )
    return job


def fail_running_job(job: ProvisioningJob, explanation: str, *, cause: str) -> bool:
    ended = _finish_job(job, Outcome(JobState.FAILED, None, explanation, ""))
    if ended and job.kind == ProvisioningJob.Kind.PROVISION:
        try_transition(job.node, S.FAILED, cause, from_states=(S.PROVISIONING,))
    elif ended and job.kind == ProvisioningJob.Kind.DEPROVISION:
        try_transition(job.node, S.FAILED, cause, from_states=(S.DEPROVISIONING,))
    return ended


def job_recover_interrupted(*, job: ProvisioningJob) -> ProvisioningJob:
    """The task of a `running` job came again: its worker died (acks_late redelivers it).

    Stop a leftover Ansible process on this machine, fail the job and its node. Never run the
    playbook again by ourselves: a half-done run may have side effects a person should see."""
    here = socket.gethostname()
    if (
        job.worker == here
        and job.worker_pid
        and job.worker_pid != os.getpid()
        and pid_alive(job.worker_pid)
    ):
        # Its worker lives: a duplicate delivery, not a death.
        log.warning("job %s is still run by live pid %s; leaving it", job.pk, job.worker_pid)
        return job
    explanation = WORKER_DIED
    if job.runner_pid and job.worker == here and pid_alive(job.runner_pid):
        kill_process_group(job.runner_pid)
        explanation += f" Its leftover Ansible process (pid {job.runner_pid}) was stopped."
    fail_running_job(job, explanation, cause=f"job {job.pk}: {WORKER_DIED}")
    return job


def job_cancel(*, job: ProvisioningJob) -> ProvisioningJob:
    """Cancel a pending job at once; ask a running one to stop (the runner polls the flag)."""
    canceled = ProvisioningJob.objects.filter(pk=job.pk, state=JobState.PENDING).update(
        state=JobState.CANCELED,
        explanation="Canceled before it started.",
        finished_at=timezone.now(),
    )
    if canceled:
        job.refresh_from_db()
        if job.kind == ProvisioningJob.Kind.PROVISION:
            try_transition(
                job.node,
                S.FAILED,
                f"provisioning job {job.pk} canceled before it started",
                from_states=(S.REQUESTED,),
            )
        return job
    ProvisioningJob.objects.filter(pk=job.pk, state=JobState.RUNNING).update(cancel_requested=True)
    job.refresh_from_db()
    if job.state not in ACTIVE_JOB_STATES:
        raise Conflict(f"Job {job.pk} is already {job.state}; there is nothing to cancel.")
    return job
