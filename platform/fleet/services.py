"""Every business rule of the fleet: placing nodes, the node state machine, provisioning jobs,
heartbeats, enrollment and the periodic sweeps. Views and tasks parse input and call one of these.

Work is claimed atomically (`filter(pk=..., state=old).update(state=new)`, continue only when one
row changed), so two workers, a retry and a sweep never act on the same job or node twice. The
long-running services (node_provision, node_deprovision_run) are not one transaction: each step
commits on its own, so the portal sees the job's events while Ansible runs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from fleet.models import (
    ACTIVE_JOB_STATES,
    Enrollment,
    Host,
    JobEvent,
    JobState,
    Node,
    NodeAction,
    NodeState,
    NodeTransition,
    ProvisioningJob,
    TelemetrySample,
)

log = logging.getLogger(__name__)

S = NodeState
# The node state machine (DESIGN.md). requested -> failed is ours: a provisioning job canceled
# before it started leaves a node that never provisioned, and failed is where retry starts.
TRANSITIONS: dict[str, frozenset[str]] = {
    S.REQUESTED: frozenset({S.PROVISIONING, S.READY, S.DEPROVISIONING, S.FAILED}),
    S.PROVISIONING: frozenset({S.READY, S.FAILED}),
    S.READY: frozenset({S.DEGRADED, S.SUSPENDED, S.DEPROVISIONING}),
    S.DEGRADED: frozenset({S.READY, S.SUSPENDED, S.DEPROVISIONING}),
    S.SUSPENDED: frozenset({S.READY, S.DEPROVISIONING}),
    S.DEPROVISIONING: frozenset({S.TERMINATED}),
    S.FAILED: frozenset({S.PROVISIONING, S.DEPROVISIONING}),
    S.TERMINATED: frozenset(),
}
LIVE = ~Q(state=S.TERMINATED)
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"

CANCEL_POLL_SECONDS = 2.0  # how often a running job re-reads cancel_requested
HEALTH_WAIT_SECONDS = 20.0  # how long a finished provision waits for the agent to answer
HTTP_TIMEOUT_SECONDS = 5.0
KILL_GRACE_SECONDS = 5.0
WORKER_DIED = "The worker running this job died; retry the node."


class FleetError(Exception):
    """A request the fleet refuses, with a sentence for people. `status` is the HTTP status an
    API answers with; `field` names the input at fault, if one is."""

    status = 409

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(FleetError):
    status = 400


class InvalidTransition(FleetError):
    status = 409


class Conflict(FleetError):
    status = 409


class NoCapacity(FleetError):
    status = 503


class NotAuthenticated(FleetError):
    status = 401


class NotFound(FleetError):
    status = 404


class Gone(FleetError):
    status = 410


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_node_token() -> tuple[str, str]:
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


# ---- the state machine ----------------------------------------------------------------------


def _claim_transition(node: Node, from_state: str, to_state: str, cause: str) -> bool:
    """Move `node` from `from_state` to `to_state` if it is still there; record why."""
    if to_state not in TRANSITIONS[from_state]:
        raise InvalidTransition(
            f"A node cannot go from {from_state} to {to_state}"
            f" (from {from_state} it can go to: {', '.join(sorted(TRANSITIONS[from_state])) or 'nowhere'})."
        )
    with transaction.atomic():
        now = timezone.now()
        changed = Node.objects.filter(pk=node.pk, state=from_state).update(
            state=to_state, updated=now
        )
        if changed != 1:
            return False
        NodeTransition.objects.create(
            node_id=node.pk, from_state=from_state, to_state=to_state, cause=cause
        )
    node.state = to_state
    node.updated = now
    return True


@transaction.atomic
def node_transition(*, node: Node, to_state: str, cause: str) -> Node:
    """Move a node to `to_state` from the state the caller saw it in, recording `cause`.

    Raises InvalidTransition for a move the state machine forbids, and Conflict when the node
    changed state meanwhile (someone else acted first; reload and decide again)."""
    seen = node.state
    if not cause.strip():
        raise InvalidInput("A transition needs a cause.", field="cause")
    if not _claim_transition(node, seen, to_state, cause):
        current = Node.objects.filter(pk=node.pk).values_list("state", flat=True).first()
        raise Conflict(f"The node changed from {seen} to {current} meanwhile; nothing was done.")
    return node


def _try_transition(node: Node, to_state: str, cause: str, *, from_states: tuple = ()) -> bool:
    """The transition for sweeps and heartbeats: only from `from_states` (default: the state the
    node was loaded in), silently nothing when another actor got there first."""
    for from_state in from_states or (node.state,):
        if to_state in TRANSITIONS[from_state] and _claim_transition(
            node, from_state, to_state, cause
        ):
            return True
    return False


# ---- requesting nodes -----------------------------------------------------------------------


def _validate_node_name(name: str) -> str:
    name = (name or "").strip()
    if not NODE_NAME.match(name):
        raise InvalidInput(f"{name!r} is not a valid node name: use {NAME_RULE}.", field="name")
    return name


def _node_dir(host: Host, node_id: uuid.UUID) -> str:
    if host.base_dir:
        base = host.base_dir
    elif host.kind == Host.Kind.LOCAL:
        base = str(settings.NODES_DIR)
    else:
        base = "/var/lib/vtpu/nodes"
    return str(Path(base) / str(node_id))


def _agent_url(host: Host, port: int) -> str:
    address = host.agent_host
    if address in ("", "0.0.0.0", "::"):  # listens everywhere: reach it by the host's address
        address = host.address or "127.0.0.1"
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}"


def _place_node(host: Host | None) -> tuple[Host, int]:
    """The host with most room (or the one staff chose) and its lowest free agent port.

    Host rows are locked (PostgreSQL) so two requests never pick the same port; the unique
    constraint on (host, agent_port) among live nodes backs this up on every database."""
    hosts = Host.objects.select_for_update()
    hosts = hosts.filter(pk=host.pk) if host is not None else hosts.filter(is_active=True)
    choices: list[tuple[int, str, Host, int]] = []
    for candidate in hosts:
        live = Node.objects.filter(LIVE, host=candidate)
        count = live.count()
        if count >= candidate.capacity:
            continue
        used = set(live.values_list("agent_port", flat=True))
        port = next(
            (
                p
                for p in range(candidate.port_range_start, candidate.port_range_end + 1)
                if p not in used
            ),
            None,
        )
        if port is not None:
            choices.append((count - candidate.capacity, candidate.name, candidate, port))
    if not choices:
        if host is not None:
            raise NoCapacity(f"Host {host.name} is full (capacity {host.capacity}).", field="host")
        raise NoCapacity("No host has room for a new node right now; try again later.")
    choices.sort(key=lambda c: (c[0], c[1]))
    return choices[0][2], choices[0][3]


def _record_birth(node: Node, cause: str) -> None:
    NodeTransition.objects.create(node=node, from_state="", to_state=node.state, cause=cause)


def _queue(task_name: str, job_id: int) -> None:
    from fleet import tasks  # tasks import this module

    task = getattr(tasks, task_name)
    transaction.on_commit(lambda: task.delay(job_id))


@dataclass(frozen=True)
class RequestedNode:
    node: Node
    job: ProvisioningJob


@transaction.atomic
def node_request(
    *, customer: AbstractBaseUser, name: str, host: Host | None = None
) -> RequestedNode:
    """A new node for `customer` on `host` (staff only) or the host with most room; its
    provisioning job is queued once this transaction commits."""
    name = _validate_node_name(name)
    if host is not None and not customer.is_staff:
        raise InvalidInput("Only staff can choose the host of a node.", field="host")
    if Node.objects.filter(LIVE, customer=customer, name=name).exists():
        raise Conflict(f"You already have a node named {name!r}.", field="name")
    host, port = _place_node(host)
    token, token_hash = _new_node_token()
    node_id = uuid.uuid4()
    node = Node.objects.create(
        id=node_id,
        customer=customer,
        name=name,
        kind=Node.Kind.PROVISIONED,
        host=host,
        node_dir=_node_dir(host, node_id),
        agent_port=port,
        agent_url=_agent_url(host, port),
        token=token,
        token_sha256=token_hash,
    )
    _record_birth(node, f"requested by {customer.get_username()} on host {host.name}")
    job = ProvisioningJob.objects.create(node=node, kind=ProvisioningJob.Kind.PROVISION)
    _queue("provision_node", job.pk)
    return RequestedNode(node=node, job=job)


@transaction.atomic
def node_retry(*, node: Node) -> ProvisioningJob:
    """A new provisioning job for a failed node (the node moves on when a worker claims it)."""
    node.refresh_from_db(fields=["state"])
    if node.state != S.FAILED:
        raise Conflict(f"Only a failed node can be retried; {node.name} is {node.state}.")
    if node.kind != Node.Kind.PROVISIONED:
        raise Conflict("An enrolled node is retried by running its install command again.")
    try:
        with transaction.atomic():
            job = ProvisioningJob.objects.create(node=node, kind=ProvisioningJob.Kind.PROVISION)
    except IntegrityError:
        raise Conflict(f"Node {node.name} already has a job pending or running.") from None
    _queue("provision_node", job.pk)
    return job


# ---- jobs: claim, run, finish, recover ------------------------------------------------------


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
    """Record the final state once; False when a sweep or recovery already ended the job."""
    status = outcome.status if outcome.status in JobState.values else JobState.FAILED
    fields = {
        "state": status,
        "rc": outcome.rc,
        "explanation": outcome.explanation,
        "finished_at": timezone.now(),
    }
    if outcome.stdout:
        fields["stdout"] = outcome.stdout
    done = ProvisioningJob.objects.filter(pk=job.pk, state=JobState.RUNNING).update(**fields) == 1
    job.refresh_from_db()
    return done


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


def _pid_alive(pid: int | None) -> bool:
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


def _kill_process_group(pid: int) -> None:
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
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
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
        if leftover and _pid_alive(leftover[0]):
            _kill_process_group(leftover[0])
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


def _provision_spec(job: ProvisioningJob) -> Any:
    from fleet.wheel import node_wheel_path

    runner = _runner()
    node, host = job.node, job.node.host
    return runner.JobSpec(
        playbook="provision.yml",
        target=_target(runner, node, host),
        extravars={
            "node_id": str(node.pk),
            "node_dir": node.node_dir,
            "agent_host": host.agent_host,
            "agent_port": node.agent_port,
            "wheel_path": str(node_wheel_path()),
            "node_token": node.token,
            "control_plane_url": settings.PUBLIC_URL,
            "heartbeat_seconds": settings.HEARTBEAT_SECONDS,
            "tdp_watts": float(host.tdp_watts),
        },
        secret_vars=frozenset({"node_token"}),
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
        python=host.python,
    )


def _load_job(job_id: int) -> ProvisioningJob | None:
    job = ProvisioningJob.objects.select_related("node", "node__host").filter(pk=job_id).first()
    if job is None:
        log.warning("job %s does not exist (deleted?); nothing to do", job_id)
    return job


def node_provision(*, job_id: int) -> ProvisioningJob | None:
    """Run a node's provisioning job once: claim it, run provision.yml, record the outcome.

    A job found `running` means this task was delivered again after its worker died: the job
    is failed (never run a second time on its own; a person decides to retry)."""
    if not _claim_job(job_id):
        job = _load_job(job_id)
        if job is not None and job.state == JobState.RUNNING:
            return job_recover_interrupted(job=job)
        if job is not None:
            log.info("job %s is already %s; nothing to do", job_id, job.state)
        return job
    job = _load_job(job_id)
    node = job.node
    if node.state in (S.REQUESTED, S.FAILED):
        _try_transition(node, S.PROVISIONING, f"provisioning job {job.pk} started")
    if node.state != S.PROVISIONING:
        _finish_job(
            job,
            Outcome(JobState.FAILED, None, f"The node is {node.state}; nothing to provision.", ""),
        )
        return job
    outcome = _run_claimed(job, _provision_spec)
    if not _finish_job(job, outcome):
        log.warning("job %s had already been ended (%s) by a sweep", job.pk, job.state)
        return job
    node.refresh_from_db()
    if job.state == JobState.SUCCESSFUL:
        if node.state == S.PROVISIONING and _agent_healthy(node, wait=HEALTH_WAIT_SECONDS):
            Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now())
            _try_transition(
                node, S.READY, f"provisioning job {job.pk} succeeded; the agent answers"
            )
        # otherwise the first heartbeat makes it ready (an agent we cannot reach, e.g. NAT)
    else:
        reason = job.explanation or f"provisioning job {job.pk} {job.state}"
        _try_transition(node, S.FAILED, f"provisioning job {job.pk} {job.state}: {reason}")
    return job


def node_deprovision_run(*, job_id: int) -> ProvisioningJob | None:
    """Run a node's deprovisioning job once; success terminates the node. A failure leaves it
    deprovisioning, and deleting it again starts a new job."""
    if not _claim_job(job_id):
        job = _load_job(job_id)
        if job is not None and job.state == JobState.RUNNING:
            return job_recover_interrupted(job=job)
        return job
    job = _load_job(job_id)
    outcome = _run_claimed(job, _deprovision_spec)
    if _finish_job(job, outcome) and job.state == JobState.SUCCESSFUL:
        _try_transition(job.node, S.TERMINATED, f"deprovisioning job {job.pk} succeeded")
    return job


def _fail_running_job(job: ProvisioningJob, explanation: str, *, cause: str) -> bool:
    ended = _finish_job(job, Outcome(JobState.FAILED, None, explanation, ""))
    if ended and job.kind == ProvisioningJob.Kind.PROVISION:
        _try_transition(job.node, S.FAILED, cause, from_states=(S.PROVISIONING,))
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
        and _pid_alive(job.worker_pid)
    ):
        # Its worker lives: a duplicate delivery (broker visibility timeout), not a death.
        log.warning("job %s is still run by live pid %s; leaving it", job.pk, job.worker_pid)
        return job
    explanation = WORKER_DIED
    if job.runner_pid and job.worker == here and _pid_alive(job.runner_pid):
        _kill_process_group(job.runner_pid)
        explanation += f" Its leftover Ansible process (pid {job.runner_pid}) was stopped."
    _fail_running_job(job, explanation, cause=f"job {job.pk}: {WORKER_DIED}")
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
            _try_transition(
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


@transaction.atomic
def node_deprovision(*, node: Node, cause: str) -> ProvisioningJob | None:
    """Take a node down (a customer's DELETE). Returns the deprovisioning job, if one runs.

    A node whose provisioning never started is terminated at once; an enrolled node is marked
    deprovisioning and its agent is told to stop at its next heartbeat (410)."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    active = node.jobs.filter(state__in=ACTIVE_JOB_STATES).first()
    if node.state == S.TERMINATED:
        raise Conflict(f"Node {node.name} is already terminated.")
    if node.state == S.PROVISIONING:
        raise Conflict(
            f"Node {node.name} is being provisioned (job {active.pk if active else '?'}); cancel"
            " that job or wait for it to end, then delete the node."
        )
    if node.state in (S.REQUESTED, S.FAILED) and active is not None:
        job_cancel(job=active)  # a provisioning job that has not started yet
        active.refresh_from_db()
        if active.state != JobState.CANCELED:
            raise Conflict(f"Job {active.pk} started meanwhile; delete the node again.")
        active = None
        node.refresh_from_db()
    if node.state == S.REQUESTED or (node.state == S.FAILED and _never_ran(node)):
        # Nothing was installed anywhere: no playbook to run.
        node_transition(node=node, to_state=S.DEPROVISIONING, cause=cause)
        node_transition(node=node, to_state=S.TERMINATED, cause="nothing was installed yet")
        return None
    if active is not None and active.kind == ProvisioningJob.Kind.PROVISION:
        # Its first heartbeat made it ready while the playbook's last checks still run.
        raise Conflict(
            f"Node {node.name} is finishing its provisioning (job {active.pk}); delete it again"
            " when that job has ended."
        )
    if node.state != S.DEPROVISIONING:
        node_transition(node=node, to_state=S.DEPROVISIONING, cause=cause)
    if node.kind == Node.Kind.ENROLLED:
        return None  # its agent learns it at the next heartbeat
    if active is not None:
        return active  # already being deprovisioned: DELETE is idempotent
    job = ProvisioningJob.objects.create(node=node, kind=ProvisioningJob.Kind.DEPROVISION)
    _queue("deprovision_node", job.pk)
    return job


def _never_ran(node: Node) -> bool:
    """True when no job of the node ever started (only canceled-before-start jobs)."""
    return not node.jobs.filter(started_at__isnull=False).exists()


# ---- agents: health, telemetry, heartbeats --------------------------------------------------


def _agent_get(node: Node, path: str, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> Any:
    request = urllib.request.Request(
        node.agent_url.rstrip("/") + path, headers={"Authorization": f"Bearer {node.token}"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 - our own URL
        return json.loads(reply.read(4 * 1024 * 1024))


def _agent_healthy(node: Node, *, wait: float) -> bool:
    if not node.agent_url:
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            _agent_get(node, "/vTPU/health", timeout=3)
            return True
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                log.info("node %s: agent not reachable (%s); waiting for a heartbeat", node, exc)
                return False
            time.sleep(1)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _store_sample(node: Node, telemetry: dict) -> TelemetrySample:
    cache = telemetry.get("cache_hit_rate")
    if isinstance(cache, dict):
        cache = cache.get("combined")
    return TelemetrySample.objects.create(
        node=node,
        ops_per_cycle=_number(telemetry.get("ops_per_cycle")),
        throughput_gops=_number(telemetry.get("throughput_gops")),
        power_watts=_number(telemetry.get("power_watts")),
        mops_per_watt=_number(telemetry.get("mops_per_watt")),
        cache_hit_rate=_number(cache),
        data=telemetry,
    )


def authenticate_node(*, node_id: uuid.UUID, token: str | None) -> Node:
    """The node whose token this is (401 without a token or with a wrong one, 404 unknown)."""
    if not token:
        raise NotAuthenticated("Send the node token as 'Authorization: Bearer <token>'.")
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        raise NotFound(f"There is no node {node_id}.")
    if not hmac.compare_digest(node.token_sha256, hash_token(token)):
        raise NotAuthenticated("This is not the token of that node.")
    return node


def heartbeat_record(
    *,
    node_id: uuid.UUID,
    token: str | None,
    version: str = "",
    agent_url: str | None = None,
    telemetry: dict | None = None,
    results: list[dict] | None = None,
) -> dict:
    """An agent's heartbeat: record life and telemetry, move the node, hand out actions.

    Raises Gone (410) for a node that is deprovisioning or terminated; an enrolled node that
    was deprovisioning is terminated by that very heartbeat (its agent stops on the 410)."""
    node = authenticate_node(node_id=node_id, token=token)
    if node.state == S.DEPROVISIONING and node.kind == Node.Kind.ENROLLED:
        _try_transition(node, S.TERMINATED, "its agent was told to stop at its heartbeat (410)")
    if node.state in (S.DEPROVISIONING, S.TERMINATED):
        raise Gone(f"Node {node.pk} is {node.state}; stop its agent.")
    with transaction.atomic():
        now = timezone.now()
        fields: dict[str, Any] = {"last_heartbeat_at": now, "last_seen_at": now}
        if version:
            fields["version"] = version[:50]
        if node.kind == Node.Kind.ENROLLED and agent_url is not None:
            fields["agent_url"] = agent_url[:255]
        if isinstance(telemetry, dict):
            fields["last_telemetry"] = telemetry
            _store_sample(node, telemetry)
        Node.objects.filter(pk=node.pk).update(**fields)
        if node.state == S.PROVISIONING:
            _try_transition(node, S.READY, "first heartbeat of its agent")
        elif node.state == S.REQUESTED and node.kind == Node.Kind.ENROLLED:
            _try_transition(node, S.READY, "first heartbeat of the enrolled agent")
        elif node.state == S.DEGRADED:
            _try_transition(node, S.READY, "heartbeat received again")
        _record_action_results(node, results or [])
        actions = _deliver_actions(node, now)
    return {
        "state": node.state,
        "heartbeat_seconds": settings.HEARTBEAT_SECONDS,
        "actions": actions,
    }


def _record_action_results(node: Node, results: list[dict]) -> None:
    for result in results:
        action_id = str(result.get("action_id") or "")
        if not action_id.isdigit():
            continue
        NodeAction.objects.filter(node=node, pk=int(action_id), completed_at__isnull=True).update(
            completed_at=timezone.now(),
            ok=bool(result.get("ok")),
            result=result.get("result") if isinstance(result.get("result"), dict) else None,
            error=str(result.get("error") or "")[:10000],
        )


def _deliver_actions(node: Node, now: datetime) -> list[dict]:
    pending = list(NodeAction.objects.filter(node=node, delivered_at__isnull=True))
    delivered = []
    for action in pending:
        # Claim each action so two concurrent heartbeats never deliver it twice.
        if NodeAction.objects.filter(pk=action.pk, delivered_at__isnull=True).update(
            delivered_at=now
        ):
            delivered.append({"id": str(action.pk), "type": action.kind, **action.payload})
    return delivered


@transaction.atomic
def node_action_request(*, node: Node, kind: str, payload: dict | None = None) -> NodeAction:
    """Queue work for a node's agent; its next heartbeat reply carries it."""
    if kind not in NodeAction.Kind.values:
        raise InvalidInput(f"Unknown action {kind!r}.", field="type")
    if node.state not in (S.READY, S.DEGRADED, S.SUSPENDED):
        raise Conflict(f"Node {node.name} is {node.state}; it takes actions when ready.")
    return NodeAction.objects.create(node=node, kind=kind, payload=payload or {})


# ---- enrollment -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedEnrollment:
    enrollment: Enrollment
    secret: str  # in the install URL; only its hash is stored


@transaction.atomic
def enrollment_create(*, customer: AbstractBaseUser) -> CreatedEnrollment:
    secret = secrets.token_urlsafe(24)
    enrollment = Enrollment.objects.create(
        customer=customer,
        secret_sha256=hash_token(secret),
        expires_at=timezone.now() + timedelta(seconds=settings.ENROLLMENT_TTL_SECONDS),
    )
    return CreatedEnrollment(enrollment=enrollment, secret=secret)


def _unique_node_name(customer: AbstractBaseUser, hostname: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:55] or "node"
    name, n = base, 1
    while Node.objects.filter(LIVE, customer=customer, name=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass(frozen=True)
class EnrolledNode:
    node: Node
    token: str  # handed to the agent once; stored hashed and encrypted


def enrollment_usable(*, secret: str) -> Enrollment:
    """The enrollment of `secret` if it can still be used: NotFound if unknown, Gone if used or
    expired."""
    enrollment = Enrollment.objects.filter(secret_sha256=hash_token(secret or "")).first()
    if enrollment is None or not hmac.compare_digest(
        enrollment.secret_sha256, hash_token(secret or "")
    ):
        raise NotFound("Unknown enrollment link; create one in your account.")
    if enrollment.used_at is not None:
        raise Gone("This enrollment link was already used; create a new one.")
    if enrollment.expires_at <= timezone.now():
        raise Gone(
            f"This enrollment link expired at {enrollment.expires_at:%Y-%m-%d %H:%M} UTC;"
            " create a new one."
        )
    return enrollment


@transaction.atomic
def enrollment_complete(
    *, secret: str, hostname: str, agent_url: str | None, port: int | None
) -> EnrolledNode:
    """Turn a used enrollment link into a node of its customer (kind enrolled, `requested`
    until its first heartbeat). A link works once."""
    enrollment = enrollment_usable(secret=secret)
    if not Enrollment.objects.filter(pk=enrollment.pk, used_at__isnull=True).update(
        used_at=timezone.now()
    ):
        raise Gone("This enrollment link was already used; create a new one.")
    token, token_hash = _new_node_token()
    node = Node.objects.create(
        customer=enrollment.customer,
        name=_unique_node_name(enrollment.customer, hostname),
        kind=Node.Kind.ENROLLED,
        agent_port=port,
        agent_url=agent_url or "",
        token=token,
        token_sha256=token_hash,
    )
    _record_birth(node, f"enrolled from host {hostname!r}")
    Enrollment.objects.filter(pk=enrollment.pk).update(node=node)
    return EnrolledNode(node=node, token=token)


# ---- periodic sweeps (Celery beat) ----------------------------------------------------------


def fail_orphaned_jobs() -> int:
    """Fail running jobs nobody runs any more: no event for longer than the runner's own idle
    timeout (+60 s) or older than its job timeout (+120 s), and no live runner here."""
    now = timezone.now()
    idle_cutoff = now - timedelta(seconds=settings.PROVISIONING_IDLE_TIMEOUT + 60)
    total_cutoff = now - timedelta(seconds=settings.PROVISIONING_JOB_TIMEOUT + 120)
    here = socket.gethostname()
    failed = 0
    for job in ProvisioningJob.objects.filter(state=JobState.RUNNING).select_related("node"):
        last = job.last_event_at or job.started_at or job.created
        started = job.started_at or job.created
        if last > idle_cutoff and started > total_cutoff:
            continue
        if job.worker == here and _pid_alive(job.runner_pid):
            continue  # still working here; its runner enforces its own timeouts
        explanation = (
            f"No progress since {last:%H:%M:%S} UTC and its worker is gone; retry the node."
        )
        if _fail_running_job(job, explanation, cause=f"job {job.pk}: {explanation}"):
            failed += 1
    return failed


def mark_silent_nodes() -> int:
    """Ready nodes with no sign of life for 3 heartbeats become degraded."""
    silence = 3 * settings.HEARTBEAT_SECONDS
    cutoff = timezone.now() - timedelta(seconds=silence)
    silent = Node.objects.filter(state=S.READY).filter(
        Q(last_seen_at__lt=cutoff) | Q(last_seen_at__isnull=True, updated__lt=cutoff)
    )
    return sum(
        _try_transition(node, S.DEGRADED, f"no heartbeat for {silence} s") for node in silent
    )


def poll_node(*, node: Node) -> TelemetrySample | None:
    """GET a reachable agent's telemetry; a failure degrades the node."""
    try:
        telemetry = _agent_get(node, "/vTPU/telemetry")
        if not isinstance(telemetry, dict):
            raise ValueError("telemetry is not a JSON object")
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        _try_transition(node, S.DEGRADED, f"telemetry poll failed: {reason}")
        return None
    now = timezone.now()
    sample = _store_sample(node, telemetry)
    Node.objects.filter(pk=node.pk).update(last_seen_at=now, last_telemetry=telemetry)
    if node.state == S.DEGRADED:
        _try_transition(node, S.READY, "telemetry poll answered")
    return sample


def poll_nodes() -> int:
    """Poll the nodes we can reach (provisioned on our hosts); enrolled ones report by
    heartbeat, since they may sit behind NAT."""
    nodes = Node.objects.filter(
        kind=Node.Kind.PROVISIONED, state__in=[S.READY, S.DEGRADED]
    ).exclude(agent_url="")
    return sum(poll_node(node=node) is not None for node in nodes)
