"""What the staff dashboard reads about the fleet's health: nodes by state, open alerts, hosts
and their capacity, benchmark regressions and billing's reconciliation mismatches."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Count, Q

from billing.models import ReconciliationIssue
from fleet.models import Host, Node, NodeState
from monitoring.models import Alert

LIVE_STATES = (NodeState.READY, NodeState.DEGRADED, NodeState.SUSPENDED)
# The alert rules a benchmark result raises (monitoring.alerts._judge_result).
BENCHMARK_RULES = (
    Alert.Rule.SLOWER_THAN_MEDIAN,
    Alert.Rule.OPS_PER_CYCLE_LOW,
    Alert.Rule.INCORRECT_RESULT,
)
REGRESSION_DAYS = 7
LIMIT = 50


def nodes_by_state() -> list[dict]:
    """Every node state with its count (0 included), in the lifecycle's order."""
    counts = dict(Node.objects.values_list("state").annotate(n=Count("pk")).order_by())
    return [{"state": state, "nodes": counts.get(state, 0)} for state in NodeState.values]


def open_alerts() -> list[Alert]:
    return list(
        Alert.objects.filter(state=Alert.State.OPEN)
        .select_related("node", "account")
        .order_by("-opened_at", "-pk")[:LIMIT]
    )


def hosts_with_capacity() -> list[Host]:
    """Hosts with `live_nodes` (ready, degraded, suspended) beside their capacity."""
    return list(
        Host.objects.annotate(
            live_nodes=Count("nodes", filter=Q(nodes__state__in=LIVE_STATES)),
            all_nodes=Count("nodes", filter=~Q(nodes__state=NodeState.TERMINATED)),
        ).order_by("name")
    )


def benchmark_regressions(*, now: datetime) -> list[Alert]:
    """Benchmark alerts open now or opened in the last REGRESSION_DAYS days."""
    since = now - timedelta(days=REGRESSION_DAYS)
    return list(
        Alert.objects.filter(rule__in=BENCHMARK_RULES)
        .filter(Q(state=Alert.State.OPEN) | Q(opened_at__gte=since))
        .select_related("node", "account")
        .order_by("-opened_at", "-pk")[:LIMIT]
    )


def reconciliation_mismatches() -> list[ReconciliationIssue]:
    return list(
        ReconciliationIssue.objects.filter(resolved_at__isnull=True)
        .select_related("account")
        .order_by("-last_seen")[:LIMIT]
    )
