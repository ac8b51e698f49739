"""Prometheus' HTTP service discovery: the node agents an operator's Prometheus may scrape
(docs/architecture.md, "Metrics").

Every ready or degraded node's agent `/metrics`, labelled like the control plane's own series
(node id, account id) plus `node_name`. Provisioned nodes run on our hosts at addresses we chose;
an enrolled node's address is whatever its customer's agent reported, so it is listed only once
staff approved it (Node.scrape_approved), else Prometheus could be pointed into our own network
(server-side request forgery).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.db.models import Q

from fleet.models import Node, NodeState

SCRAPED_STATES = (NodeState.READY, NodeState.DEGRADED)


def prometheus_targets() -> list[dict]:
    """The http_sd document: one target group per node, in a stable order."""
    nodes = (
        Node.objects.filter(state__in=SCRAPED_STATES)
        .exclude(agent_url="")
        .filter(Q(kind=Node.Kind.PROVISIONED) | Q(scrape_approved=True))
        .order_by("created", "id")
    )
    groups = []
    for node in nodes:
        target = _target(node.agent_url)
        if target is None:
            continue
        address, scheme, path = target
        groups.append(
            {
                "targets": [address],
                "labels": {
                    "__scheme__": scheme,
                    "__metrics_path__": path,
                    "node": str(node.pk),
                    "account": str(node.account_id),
                    "node_name": node.name,
                },
            }
        )
    return groups


def _target(agent_url: str) -> tuple[str, str, str] | None:
    """(host:port, scheme, metrics path) of an agent URL; None when it is not a usable URL."""
    try:
        parts = urlsplit(agent_url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}", parts.scheme, parts.path.rstrip("/") + "/metrics"
