"""The agents' outbound channel: heartbeats carry life, telemetry and action results in; their
replies carry actions out (docs/architecture.md, "Heartbeats and actions").

A heartbeat authenticates before anything else: the node is found by the SHA-256 of the node
secret it presents, so a stranger learns nothing (not even whether a node id exists), and the
customer's access token (which its account can read) can never speak for the node.

Actions are delivered at least once: an action stays pending until the agent reports its result
and is sent again when no result came within ACTION_RESEND_SECONDS; the agent applies an action
id once, so a lost reply never loses (nor doubles) a suspend.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from fleet.models import Node, NodeAction, NodeState
from fleet.services.agents import store_sample
from fleet.services.credentials import hash_secret
from fleet.services.errors import Gone, NotAuthenticated
from fleet.services.transitions import try_transition
from fleet.signals import action_completed

log = logging.getLogger(__name__)
S = NodeState


def authenticate_node(*, node_id: uuid.UUID, secret: str | None) -> Node:
    """The node whose secret this is, if it is `node_id`'s; 401 for anything else, the same
    answer for an unknown node as for a wrong secret."""
    if not secret:
        raise NotAuthenticated("Send the node secret as 'Authorization: Bearer <secret>'.")
    digest = hash_secret(secret)
    # Not the telemetry (kilobytes of JSON) nor the access token (a decryption): a heartbeat
    # needs neither, and they load on first use if anything does.
    node = Node.objects.filter(secret_sha256=digest).defer("last_telemetry", "access_token").first()
    if (
        node is None
        or not hmac.compare_digest(node.secret_sha256 or "", digest)
        or node.pk != node_id
    ):
        raise NotAuthenticated("This is not the secret of that node.")
    return node


def heartbeat_record(
    *,
    node_id: uuid.UUID,
    secret: str | None,
    version: str = "",
    agent_url: str | None = None,
    telemetry: dict | None = None,
    results: list[dict] | None = None,
) -> dict:
    """An agent's heartbeat: record life and telemetry, move the node, hand out actions.

    Raises Gone (410) for a node that is deprovisioning or terminated; an enrolled node that
    was deprovisioning is terminated by that very heartbeat (its agent stops on the 410)."""
    return heartbeat_accept(
        node=authenticate_node(node_id=node_id, secret=secret),
        version=version,
        agent_url=agent_url,
        telemetry=telemetry,
        results=results,
    )


def heartbeat_accept(
    *,
    node: Node,
    version: str = "",
    agent_url: str | None = None,
    telemetry: dict | None = None,
    results: list[dict] | None = None,
) -> dict:
    """heartbeat_record for the node `authenticate_node` just returned (the API authenticates
    before it validates anything, and a heartbeat is not worth a second lookup)."""
    if node.state == S.DEPROVISIONING and node.kind == Node.Kind.ENROLLED:
        try_transition(node, S.TERMINATED, "its agent was told to stop at its heartbeat (410)")
    if node.state in (S.DEPROVISIONING, S.TERMINATED):
        raise Gone(f"Node {node.pk} is {node.state}; stop its agent.")
    with transaction.atomic():
        now = timezone.now()
        fields: dict[str, Any] = {"last_heartbeat_at": now, "last_seen_at": now}
        if version:
            fields["version"] = version[:50]
        if node.kind == Node.Kind.ENROLLED and agent_url is not None:
            fields["agent_url"] = agent_url[:255]
            if fields["agent_url"] != node.agent_url:
                # Staff approved scraping the address they saw, not whatever comes next.
                fields["scrape_approved"] = False
        if isinstance(telemetry, dict):
            fields["last_telemetry"] = telemetry
            store_sample(node, telemetry)
        Node.objects.filter(pk=node.pk).update(**fields)
        if node.state == S.PROVISIONING:
            try_transition(node, S.READY, "first heartbeat of its agent")
        elif node.state == S.REQUESTED and node.kind == Node.Kind.ENROLLED:
            try_transition(node, S.READY, "first heartbeat of the enrolled agent")
        elif node.state == S.DEGRADED:
            try_transition(node, S.READY, "heartbeat received again")
        acknowledged = _record_action_results(node, results or [])
        actions = _deliver_actions(node, now)
    return {
        "state": node.state,
        "heartbeat_seconds": settings.HEARTBEAT_SECONDS,
        "actions": actions,
        "acknowledged": acknowledged,
        # The agent accepts this token for GET /metrics (Prometheus, through http_sd).
        "scrape_token_sha256": agent_scrape_token_sha256(),
    }


def agent_scrape_token_sha256() -> str | None:
    """SHA-256 of the fleet's agent scrape token (AGENT_SCRAPE_TOKEN), None when there is none."""
    token = settings.AGENT_SCRAPE_TOKEN
    return hash_secret(token) if token else None


def _record_action_results(node: Node, results: list[dict]) -> list[str]:
    """Store each result once (a result sent again changes nothing); the ids of every result
    this node has on record come back, so the agent can forget them."""
    acknowledged = []
    for result in results:
        action_id = str(result.get("action_id") or "")
        if not action_id.isdigit():
            continue
        recorded = NodeAction.objects.filter(
            node=node, pk=int(action_id), completed_at__isnull=True
        ).update(
            completed_at=timezone.now(),
            ok=bool(result.get("ok")),
            result=result.get("result") if isinstance(result.get("result"), dict) else None,
            error=str(result.get("error") or "")[:10000],
        )
        if recorded:
            _completed(NodeAction.objects.get(pk=int(action_id)))
            acknowledged.append(action_id)
        elif NodeAction.objects.filter(node=node, pk=int(action_id)).exists():
            acknowledged.append(action_id)
    return acknowledged


def _completed(action: NodeAction) -> None:
    """Tell listeners (monitoring's benchmarks) once; a failing listener never fails the
    heartbeat (fleet.signals)."""
    for receiver, outcome in action_completed.send_robust(sender=NodeAction, action=action):
        if isinstance(outcome, Exception):
            log.error("%r failed on action %s", receiver, action.pk, exc_info=outcome)


def _due(now: datetime) -> Q:
    resend_before = now - timedelta(seconds=settings.ACTION_RESEND_SECONDS)
    return Q(completed_at__isnull=True) & (
        Q(delivered_at__isnull=True) | Q(delivered_at__lt=resend_before)
    )


def _deliver_actions(node: Node, now: datetime) -> list[dict]:
    """Pending actions, oldest first: never delivered, or delivered long enough ago with no
    result (the reply was lost, or the agent restarted before it reported)."""
    delivered = []
    for action in NodeAction.objects.filter(_due(now), node=node).order_by("created", "id"):
        # Claim each delivery so two concurrent heartbeats never both carry it.
        claimed = NodeAction.objects.filter(_due(now), pk=action.pk).update(
            delivered_at=now, deliveries=action.deliveries + 1
        )
        if claimed:
            delivered.append({"id": str(action.pk), "type": action.kind, **action.payload})
    return delivered
