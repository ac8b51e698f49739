"""The control plane as a client of node agents it can reach (provisioned nodes on our hosts):
health checks that confirm *which* node answered, and telemetry polls.

Calls carry the node's access token; an agent proves it is the node we mean by answering the
authenticated health check with that node's id, so another agent on the same port (or a stale
one) never makes a node look alive (docs/architecture.md, "Liveness").
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from typing import Any

from django.db import transaction
from django.utils import timezone

from fleet.models import Node, NodeState, TelemetrySample
from fleet.services.transitions import try_transition

log = logging.getLogger(__name__)
S = NodeState

HTTP_TIMEOUT_SECONDS = 5.0
MAX_REPLY_BYTES = 4 * 1024 * 1024


class WrongAgent(ValueError):
    """An agent answered, but not as the node we asked for."""


def agent_get(node: Node, path: str, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> Any:
    request = urllib.request.Request(
        node.agent_url.rstrip("/") + path,
        headers={"Authorization": f"Bearer {node.access_token}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 - our own URL
        return json.loads(reply.read(MAX_REPLY_BYTES))


def agent_check(node: Node, *, timeout: float = 3.0) -> None:
    """Raise unless the agent at node.agent_url answers the authenticated health check as this
    node (OSError when unreachable or refusing the token, WrongAgent for another node)."""
    health = agent_get(node, "/vTPU/health", timeout=timeout)
    answered = health.get("node_id") if isinstance(health, dict) else None
    if answered != str(node.pk):
        raise WrongAgent(
            f"the agent at {node.agent_url} answered as node {answered or '(none)'}, not {node.pk}"
        )


def agent_healthy(node: Node, *, wait: float) -> bool:
    """Whether the node's own agent answers within `wait` seconds."""
    if not node.agent_url:
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            agent_check(node)
            return True
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                log.info("node %s: agent not confirmed (%s); waiting for a heartbeat", node, exc)
                return False
            time.sleep(1)


def finite_number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (bools, NaN, infinities, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


BIGINT_MAX = 2**63 - 1


def sample_counters(telemetry: dict) -> dict:
    """The cumulative counters of a telemetry document (runtime/vtpu/telemetry.py), as the
    TelemetrySample columns the economics read: ops, uptime, energy and the power source."""
    ops = telemetry.get("ops")  # an int stays exact past 2**53
    if isinstance(ops, float) and math.isfinite(ops):
        ops = int(ops)
    if isinstance(ops, bool) or not isinstance(ops, int) or abs(ops) > BIGINT_MAX:
        ops = None
    lifetime = telemetry.get("lifetime")
    sources = telemetry.get("sources")
    power_source = sources.get("power_watts") if isinstance(sources, dict) else None
    return {
        "ops_total": ops,
        "uptime_seconds": finite_number(telemetry.get("uptime_seconds")),
        "energy_joules": (
            finite_number(lifetime.get("energy_joules")) if isinstance(lifetime, dict) else None
        ),
        "energy_source": power_source if isinstance(power_source, str) else None,
    }


def store_sample(node: Node, telemetry: dict) -> TelemetrySample:
    cache = telemetry.get("cache_hit_rate")
    if isinstance(cache, dict):
        cache = cache.get("combined")
    return TelemetrySample.objects.create(
        node=node,
        ops_per_cycle=finite_number(telemetry.get("ops_per_cycle")),
        throughput_gops=finite_number(telemetry.get("throughput_gops")),
        power_watts=finite_number(telemetry.get("power_watts")),
        mops_per_watt=finite_number(telemetry.get("mops_per_watt")),
        cache_hit_rate=finite_number(cache),
        **sample_counters(telemetry),
        data=telemetry,
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc)


def poll_node(*, node: Node) -> TelemetrySample | None:
    """Confirm the node's agent and read its telemetry; a failure degrades a ready node (once:
    a node already degraded gets no new row)."""
    return poll_record(node, poll_fetch(node))


def poll_fetch(node: Node) -> dict | Exception:
    """The network half of a poll, without the database (so many can run side by side): the
    telemetry of the agent that answered as this node, or why there is none."""
    try:
        agent_check(node)
        telemetry = agent_get(node, "/vTPU/telemetry")
        if not isinstance(telemetry, dict):
            raise ValueError("telemetry is not a JSON object")
    except (OSError, ValueError) as exc:
        return exc
    return telemetry


def poll_record(node: Node, fetched: dict | Exception) -> TelemetrySample | None:
    """The database half of a poll: store what poll_fetch brought, or degrade the node."""
    if isinstance(fetched, Exception):
        try_transition(
            node, S.DEGRADED, f"health check failed: {_reason(fetched)}", from_states=(S.READY,)
        )
        return None
    # One transaction (one commit to wait for, not three) per node.
    with transaction.atomic():
        now = timezone.now()
        sample = store_sample(node, fetched)
        Node.objects.filter(pk=node.pk).update(last_seen_at=now, last_telemetry=fetched)
        try_transition(node, S.READY, "health check answered again", from_states=(S.DEGRADED,))
    return sample
