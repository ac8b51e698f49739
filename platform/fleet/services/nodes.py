"""Hosts, and an account's nodes: placing and requesting them, retry, deletion, staff's force,
the customer's access token, and actions asked of a node's agent."""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Account, User
from fleet.models import (
    ACTIVE_JOB_STATES,
    Host,
    JobState,
    Node,
    NodeAction,
    NodeState,
    ProvisioningJob,
)
from fleet.services import queue
from fleet.services.credentials import new_access_token
from fleet.services.errors import Conflict, FleetError, Forbidden, InvalidInput, NoCapacity
from fleet.services.jobs import job_cancel
from fleet.services.transitions import force_terminate, node_transition, record_birth

log = logging.getLogger(__name__)
S = NodeState
LIVE = ~Q(state=S.TERMINATED)
NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
NAME_RULE = "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"


# ---- hosts ----------------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
    address = address.strip().strip("[]")
    if address == "localhost" or address.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_check(*, kind: str, address: str, agent_host: str, public_url: str = "") -> None:
    """Refuse a host the control plane could not watch (InvalidInput with the reason).

    An SSH host's agents are health-checked and polled at agent_host (or the host's address when
    they listen everywhere): a loopback agent address there means *this* machine, not that
    host, unless the control plane itself runs on that host's loopback (address loopback too)."""
    if kind != Host.Kind.SSH:
        return
    if not address:
        raise InvalidInput("An SSH host needs an address.", field="address")
    if _is_loopback(agent_host) and not _is_loopback(address):
        where = urlsplit(public_url or settings.PUBLIC_URL).hostname or "elsewhere"
        raise InvalidInput(
            f"Agents on {address} would listen on {agent_host}, a loopback address: the control"
            f" plane (at {where}) could never reach them to check they are alive. Use the"
            f" host's address ({address}) or 0.0.0.0 as the agent address.",
            field="agent_host",
        )


# ---- placing and requesting nodes -----------------------------------------------------------


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


def agent_url_for(host: Host, port: int) -> str:
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


def check_quota(account: Account) -> None:
    """Forbidden when the account already has as many live nodes as its quota allows."""
    account = Account.objects.select_for_update().get(pk=account.pk)
    live = Node.objects.filter(LIVE, account=account).count()
    if live >= account.node_quota:
        raise Forbidden(
            f"Your account may have {account.node_quota} live node"
            f"{'' if account.node_quota == 1 else 's'} and has {live}: delete one, or ask us"
            " to raise your quota."
        )


@dataclass(frozen=True)
class RequestedNode:
    node: Node
    job: ProvisioningJob | None  # None while held for payment


@transaction.atomic
def node_request(
    *,
    account: Account,
    user: User,
    name: str,
    host: Host | None = None,
    plan_id: int | None = None,
    hold: bool = False,
) -> RequestedNode:
    """A new node for `account` on `host` (staff only) or the host with most room, billed by
    `plan_id`; its provisioning job is queued once this transaction commits, or (`hold`) when
    billing says its invoice is paid (node_provision_release)."""
    name = _validate_node_name(name)
    if host is not None and not user.is_staff:
        raise Forbidden("Only staff can choose the host of a node.", field="host")
    check_quota(account)
    if Node.objects.filter(LIVE, account=account, name=name).exists():
        raise Conflict(f"Your account already has a node named {name!r}.", field="name")
    host, port = _place_node(host)
    node_id = uuid.uuid4()
    node = Node.objects.create(
        id=node_id,
        account=account,
        requested_by=user,
        name=name,
        kind=Node.Kind.PROVISIONED,
        host=host,
        node_dir=_node_dir(host, node_id),
        agent_port=port,
        agent_url=agent_url_for(host, port),
        plan_id=plan_id,
        **new_access_token(),
    )
    record_birth(node, f"requested by {user.get_username()} on host {host.name}")
    if hold:
        return RequestedNode(node=node, job=None)
    job = ProvisioningJob.objects.create(node=node, kind=ProvisioningJob.Kind.PROVISION)
    queue.queue_job(job.pk)
    return RequestedNode(node=node, job=job)


@transaction.atomic
def node_provision_release(*, node: Node) -> ProvisioningJob | None:
    """Start provisioning a node that node_request held (its payment came): one job, queued at
    commit. None when there is nothing to start: the node is no longer requested (deleted
    meanwhile), or a job already exists (a payment reported twice)."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    if node.state != S.REQUESTED or node.kind != Node.Kind.PROVISIONED:
        return None
    if node.jobs.exists():
        return None
    job = ProvisioningJob.objects.create(node=node, kind=ProvisioningJob.Kind.PROVISION)
    queue.queue_job(job.pk)
    return job


def _new_job(node: Node, kind: str) -> ProvisioningJob:
    try:
        with transaction.atomic():
            job = ProvisioningJob.objects.create(node=node, kind=kind)
    except IntegrityError:
        raise Conflict(f"Node {node.name} already has a job pending or running.") from None
    queue.queue_job(job.pk)
    return job


@transaction.atomic
def node_retry(*, node: Node) -> ProvisioningJob:
    """A new job for a failed node: provisioning again, or (when its deletion failed)
    deprovisioning again. The node moves on when a worker claims the job."""
    node.refresh_from_db(fields=["state", "delete_requested_at"])
    if node.state != S.FAILED:
        raise Conflict(f"Only a failed node can be retried; {node.name} is {node.state}.")
    if node.delete_requested_at is not None:
        node_transition(node=node, to_state=S.DEPROVISIONING, cause="deletion retried")
        if node.kind == Node.Kind.ENROLLED:
            raise Conflict("An enrolled node is deleted at its agent's next heartbeat.")
        return _new_job(node, ProvisioningJob.Kind.DEPROVISION)
    if node.kind != Node.Kind.PROVISIONED:
        raise Conflict("An enrolled node is retried by running its install command again.")
    return _new_job(node, ProvisioningJob.Kind.PROVISION)


@transaction.atomic
def node_deprovision_request(*, node: Node, cause: str) -> ProvisioningJob | None:
    """Ask for a node to be taken down (a customer's DELETE). Returns the deprovisioning job, if
    one runs.

    A node whose provisioning never started is terminated at once; an enrolled node is marked
    deprovisioning and its agent is told to stop at its next heartbeat (410), or it is
    terminated by a sweep after a grace period if its machine never calls again."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    active = node.jobs.filter(state__in=ACTIVE_JOB_STATES).first()
    if node.state == S.TERMINATED:
        raise Conflict(f"Node {node.name} is already terminated.")
    if node.state == S.PROVISIONING:
        raise Conflict(
            f"Node {node.name} is being provisioned (job {active.pk if active else '?'}); cancel"
            " that job or wait for it to end, then delete the node."
        )
    if node.delete_requested_at is None:
        Node.objects.filter(pk=node.pk).update(delete_requested_at=timezone.now())
        node.delete_requested_at = timezone.now()
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
    if active is not None and active.kind != ProvisioningJob.Kind.DEPROVISION:
        # Its first heartbeat made it ready while the playbook's last checks still run.
        raise Conflict(
            f"Node {node.name} is finishing a {active.kind} job (job {active.pk}); delete it"
            " again when that job has ended."
        )
    if node.state != S.DEPROVISIONING:
        node_transition(node=node, to_state=S.DEPROVISIONING, cause=cause)
    if node.kind == Node.Kind.ENROLLED:
        return None  # its agent learns it at the next heartbeat
    if active is not None:
        return active  # already being deprovisioned: DELETE is idempotent
    return _new_job(node, ProvisioningJob.Kind.DEPROVISION)


def nodes_deprovision(*, nodes, cause: str) -> int:
    """node_deprovision_request for each live node of `nodes` (a queryset) that is not already
    going; one that cannot go yet (still provisioning) is logged and left for the caller's next
    run. Returns how many were asked to go."""
    count = 0
    for node in nodes.exclude(state__in=[S.DEPROVISIONING, S.TERMINATED]):
        try:
            node_deprovision_request(node=node, cause=cause)
            count += 1
        except FleetError as exc:
            log.warning("node %s not deprovisioned yet (%s): %s", node.pk, cause, exc.message)
    return count


def _never_ran(node: Node) -> bool:
    """True when no job of the node ever started (only canceled-before-start jobs)."""
    return not node.jobs.filter(started_at__isnull=False).exists()


@transaction.atomic
def node_force_terminate(*, node: Node, reason: str, by: User) -> Node:
    """Staff end a node whatever its state (a machine that is gone for good), with a reason.

    Pending jobs are canceled and running ones asked to stop; nothing is run on the host."""
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput("Say why the node is forced to terminated.", field="reason")
    now = timezone.now()
    ProvisioningJob.objects.filter(node=node, state=JobState.PENDING).update(
        state=JobState.CANCELED, explanation="Canceled: the node was forced to terminated.",
        finished_at=now,
    )  # fmt: skip
    ProvisioningJob.objects.filter(node=node, state=JobState.RUNNING).update(cancel_requested=True)
    if not force_terminate(node, f"forced to terminated by {by.get_username()}: {reason}"):
        raise Conflict(f"Node {node.name} is already terminated.")
    Node.objects.filter(pk=node.pk, delete_requested_at__isnull=True).update(
        delete_requested_at=now
    )
    node.refresh_from_db()
    return node


# ---- the customer's access token, and actions for the agent ---------------------------------


@transaction.atomic
def node_action_request(*, node: Node, kind: str, payload: dict | None = None) -> NodeAction:
    """Queue work for a node's agent; heartbeat replies carry it until its result comes back."""
    if kind not in NodeAction.Kind.values:
        raise InvalidInput(f"Unknown action {kind!r}.", field="type")
    if node.state not in (S.READY, S.DEGRADED, S.SUSPENDED, S.PROVISIONING, S.REQUESTED):
        raise Conflict(f"Node {node.name} is {node.state}; it takes no more actions.")
    return NodeAction.objects.create(node=node, kind=kind, payload=payload or {})


def node_actions_request_many(
    *, node_ids: list[uuid.UUID], kind: str, payload: dict
) -> dict[uuid.UUID, NodeAction]:
    """The same action for many nodes in one INSERT (a periodic schedule over the whole fleet);
    the caller has chosen nodes that take actions. Returns each node's action, with its id."""
    if kind not in NodeAction.Kind.values:
        raise InvalidInput(f"Unknown action {kind!r}.", field="type")
    actions = NodeAction.objects.bulk_create(
        [NodeAction(node_id=node_id, kind=kind, payload=payload) for node_id in node_ids]
    )
    return {action.node_id: action for action in actions}


def node_actions_expire(*, action_ids: list[int], error: str) -> int:
    """Give up on actions whose result never came: they are completed as failed with `error`
    and no longer sent; a result arriving later is acknowledged but changes nothing."""
    return NodeAction.objects.filter(pk__in=action_ids, completed_at__isnull=True).update(
        completed_at=timezone.now(), ok=False, error=error
    )


@transaction.atomic
def node_access_token_rotate(*, node: Node) -> Node:
    """A new access token for the node's agent: the control plane answers with it at once, and
    the agent learns its hash (never the token) through the heartbeat channel; the old token
    stops working when the agent applies the action."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    if node.state in (S.TERMINATED, S.DEPROVISIONING):
        raise Conflict(f"Node {node.name} is {node.state}; its token cannot change.")
    fields = new_access_token()
    Node.objects.filter(pk=node.pk).update(**fields)
    # An older rotation not yet applied is superseded: only the newest hash matters.
    NodeAction.objects.filter(
        node=node, kind=NodeAction.Kind.ROTATE_TOKEN, completed_at__isnull=True
    ).update(completed_at=timezone.now(), ok=False, error="superseded by a newer rotation")
    NodeAction.objects.create(
        node=node,
        kind=NodeAction.Kind.ROTATE_TOKEN,
        payload={"token_sha256": fields["access_token_sha256"]},
    )
    node.refresh_from_db()
    return node


# ---- the account's own suspension ------------------------------------------------------------

# A suspension's cause says who chose it: billing's dunning writes "suspended for non-payment…",
# the account's own writes this. Only the account's own can be resumed by the account.
BY_ACCOUNT = "(the account's choice)"


@transaction.atomic
def node_suspend(*, node: Node, by: User) -> Node:
    """The account pauses its node: its agent refuses work but keeps its data and heartbeats
    (the same suspension as billing's; not downtime)."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    if node.state not in (S.READY, S.DEGRADED):
        raise Conflict(f"Only a ready node can be suspended; {node.name} is {node.state}.")
    node_transition(
        node=node, to_state=S.SUSPENDED, cause=f"suspended by {by.get_username()} {BY_ACCOUNT}"
    )
    NodeAction.objects.create(node=node, kind=NodeAction.Kind.SUSPEND)
    return node


@transaction.atomic
def node_resume(*, node: Node, by: User) -> Node:
    """The account resumes a node it suspended itself. A node suspended for non-payment comes
    back only with the payment (billing.dunning)."""
    node = Node.objects.select_for_update().get(pk=node.pk)
    if node.state != S.SUSPENDED:
        raise Conflict(f"Only a suspended node can be resumed; {node.name} is {node.state}.")
    if not suspended_by_account(node):
        raise Forbidden(
            f"Node {node.name} was suspended because a payment failed; it resumes by itself"
            " once the open invoice is paid."
        )
    node_transition(node=node, to_state=S.READY, cause=f"resumed by {by.get_username()}")
    NodeAction.objects.create(node=node, kind=NodeAction.Kind.RESUME)
    return node


def suspended_by_account(node: Node) -> bool:
    """Whether the node's current suspension was its account's own choice."""
    last = node.transitions.filter(to_state=S.SUSPENDED).order_by("created", "id").last()
    return node.state == S.SUSPENDED and last is not None and last.cause.endswith(BY_ACCOUNT)


# ---- Prometheus: scraping enrolled nodes ----------------------------------------------------


def node_scrape_approve(*, node: Node) -> bool:
    """Staff checked an enrolled node's agent address: service discovery may list it from now
    on (until its agent reports another address). False when there is nothing to approve:
    a provisioned node (listed anyway) or an enrolled one that reported no address yet."""
    if node.kind != Node.Kind.ENROLLED or not node.agent_url:
        return False
    approved = Node.objects.filter(
        pk=node.pk, kind=Node.Kind.ENROLLED, agent_url=node.agent_url
    ).update(scrape_approved=True)
    return bool(approved)
