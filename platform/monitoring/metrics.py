"""The control plane's /metrics: one prometheus-client collector that reads the database at
scrape time, so every gunicorn worker answers the same (docs/architecture.md, "Metrics").

Names follow Prometheus' conventions: the `vtpu_` prefix, base units (ops per second, watts,
ratios), node id and account as labels and nothing unbounded. A figure a node did not measure is
left out, never shown as 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Max, Subquery
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from fleet.models import UP_STATES, Node, NodeState, ProvisioningJob
from fleet.services.agents import finite_number
from monitoring.models import Alert, BenchmarkResult, BenchmarkRun
from monitoring.uptime import nodes_uptime_30_days

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
NODE_LABELS = ["node", "account", "name"]


def _combined(value: Any) -> float | None:
    return finite_number(value.get("combined")) if isinstance(value, dict) else finite_number(value)


# (metric, help, how to read it from a node's latest telemetry)
NODE_FIGURES = (
    ("vtpu_node_ops_per_cycle", "Arithmetic ops per core cycle (the node's telemetry).",
     lambda t: finite_number(t.get("ops_per_cycle"))),
    ("vtpu_node_throughput_ops_per_second", "Ops per second over the node's last window.",
     lambda t: None if finite_number(t.get("throughput_gops")) is None
     else finite_number(t.get("throughput_gops")) * 1e9),
    ("vtpu_node_cache_hit_ratio", "CPU cache hit ratio, combined (hardware counters only).",
     lambda t: _combined(t.get("cache_hit_rate"))),
    ("vtpu_node_ppt_hit_ratio", "Phext Page Table translation-cache hit ratio.",
     lambda t: _combined(t.get("ppt_hit_rate"))),
    ("vtpu_node_power_watts", "Package power (RAPL, or the node's TDP model).",
     lambda t: finite_number(t.get("power_watts"))),
    ("vtpu_node_mops_per_watt", "Millions of ops per second per watt.",
     lambda t: finite_number(t.get("mops_per_watt"))),
)  # fmt: skip


class ControlPlaneCollector:
    def collect(self) -> Iterator[Metric]:
        nodes = list(Node.objects.exclude(state=NodeState.TERMINATED).select_related("account"))
        now = timezone.now()
        up = GaugeMetricFamily("vtpu_node_up", "1 while the node is ready.", labels=NODE_LABELS)
        uptime = GaugeMetricFamily(
            "vtpu_node_uptime_ratio_30d",
            "Uptime over the last 30 days (up / (up + down)); absent before a node served.",
            labels=NODE_LABELS,
        )
        figures = {
            name: GaugeMetricFamily(name, help_, labels=NODE_LABELS)
            for name, help_, _read in NODE_FIGURES
        }
        uptimes = nodes_uptime_30_days(nodes, now=now)  # three queries for the whole fleet
        for node in nodes:
            labels = [str(node.pk), str(node.account_id), node.name]
            up.add_metric(labels, 1.0 if node.state in UP_STATES else 0.0)
            ratio = uptimes[node.pk].ratio
            if ratio is not None:
                uptime.add_metric(labels, ratio)
            telemetry = node.last_telemetry if isinstance(node.last_telemetry, dict) else {}
            for name, _help, read in NODE_FIGURES:
                value = read(telemetry)
                if value is not None:
                    figures[name].add_metric(labels, value)
        yield up
        yield uptime
        yield from figures.values()
        yield from _benchmark_families(now)
        states = GaugeMetricFamily(
            "vtpu_nodes", "Nodes by state (terminated excluded).", labels=["state"]
        )
        counts = {s: 0 for s in NodeState.values if s != NodeState.TERMINATED}
        for node in nodes:
            counts[node.state] += 1
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        jobs = GaugeMetricFamily(
            "vtpu_provisioning_jobs",
            "Provisioning jobs by kind and state.",
            labels=["kind", "state"],
        )
        for row in ProvisioningJob.objects.values("kind", "state").annotate(n=Count("id")):
            jobs.add_metric([row["kind"], row["state"]], row["n"])
        yield jobs
        alerts = GaugeMetricFamily(
            "vtpu_alerts_open",
            "Open alerts by severity and rule (every combination, 0 when none).",
            labels=["severity", "rule"],
        )
        open_counts = {
            (row["severity"], row["rule"]): row["n"]
            for row in Alert.objects.filter(state="open")
            .values("severity", "rule")
            .annotate(n=Count("id"))
        }
        for severity in Alert.Severity.values:
            for rule in Alert.Rule.values:
                alerts.add_metric([severity, rule], open_counts.get((severity, rule), 0))
        yield alerts
        queues = _queue_lengths()
        if queues:
            family = GaugeMetricFamily(
                "vtpu_celery_queue_length", "Tasks waiting in each Celery queue.", labels=["queue"]
            )
            for queue, length in queues.items():
                family.add_metric([queue], length)
            yield family


def _queue_lengths() -> dict[str, int]:
    """LLEN of each queue in the broker; empty (and left out) when the broker cannot be read."""
    try:
        import redis

        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=1)
        return {q: int(client.llen(q)) for q in ("provisioning", "housekeeping")}
    except Exception:  # a scrape must not fail because the broker is down
        return {}


def exposition() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlPlaneCollector())
    return generate_latest(registry)


# ---- continuous benchmarks (docs/architecture.md, "Continuous benchmarks") ------------------

BENCHMARK_LABELS = ["node", "account", "workload"]
BENCHMARK_WINDOW = timedelta(days=7)  # an older last run is stale: left out


def _benchmark_families(now: datetime) -> Iterator[Metric]:
    """Each live node's last completed benchmark run (within 7 days), per workload: one query
    for the whole fleet. A figure the run did not measure is left out, never 0."""
    last_runs = (
        BenchmarkRun.objects.filter(
            state=BenchmarkRun.State.DONE, created__gte=now - BENCHMARK_WINDOW
        )
        .exclude(node__state=NodeState.TERMINATED)
        .values("node_id")
        .annotate(last=Max("id"))
        .values("last")
    )
    speedup = GaugeMetricFamily(
        "vtpu_node_benchmark_speedup_ratio",
        "Last benchmark: baseline time / ours, measured in the same run (>1: ours is faster).",
        labels=BENCHMARK_LABELS,
    )
    ops_per_cycle = GaugeMetricFamily(
        "vtpu_node_benchmark_ops_per_cycle",
        "Last benchmark: arithmetic ops per core cycle.",
        labels=BENCHMARK_LABELS,
    )
    correct = GaugeMetricFamily(
        "vtpu_node_benchmark_correct",
        "Last benchmark: 1 when the result matched its reference, 0 when it did not.",
        labels=BENCHMARK_LABELS,
    )
    rows = BenchmarkResult.objects.filter(run_id__in=Subquery(last_runs)).values_list(
        "node_id", "node__account_id", "workload", "speedup", "ops_per_cycle", "correct"
    )
    for node_id, account_id, workload, ratio, per_cycle, ok in rows:
        labels = [str(node_id), str(account_id), workload]
        if ratio is not None:
            speedup.add_metric(labels, ratio)
        if per_cycle is not None:
            ops_per_cycle.add_metric(labels, per_cycle)
        if ok is not None:
            correct.add_metric(labels, 1.0 if ok else 0.0)
    yield speedup
    yield ops_per_cycle
    yield correct
