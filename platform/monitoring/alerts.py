"""Alerts: each rule's cause on a node opens one alert, reminded while it stays open and resolved
when the cause clears (docs/architecture.md, "Alerts").

Rules:
- node down: the node is degraded, or failed after serving, outside a maintenance window; the
  alert carries the flip's cause;
- agent errors rising: the agent's `errors` counter grew by ALERT_AGENT_ERRORS or more within
  ALERT_AGENT_ERRORS_WINDOW_SECONDS;
- per benchmark result (monitoring.benchmarks sends `benchmark_recorded`):
  - incorrect result (always critical),
  - ops/cycle below the workload's floor (absolute, or by default a share of the node's own
    first runs: ops/cycle means different things for a GEMM and for a gather),
  - slower than usual: the same-run speedup against the baseline fell more than the margin below
    its 7-day median (a same-run ratio, so a noisy machine does not page anyone).

An alert opens at most once per (node, rule, workload) — a partial unique index, so two workers
evaluating at once cannot open it twice — and every opening, reminder and resolution becomes one
Notification per channel (monitoring.notify delivers them).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from fleet.models import Node, NodeState, TelemetrySample
from monitoring import notify
from monitoring.models import Alert, BenchmarkResult, BenchmarkRun, BenchmarkThreshold
from monitoring.uptime import flip_category, windows_for

log = logging.getLogger(__name__)
R, S = Alert.Rule, NodeState
WARNING, CRITICAL = Alert.Severity.WARNING, Alert.Severity.CRITICAL


# ---- opening and resolving ----------------------------------------------------------------


def alert_open(
    node: Node,
    rule: str,
    *,
    severity: str,
    summary: str,
    workload: str = "",
    details: dict | None = None,
    now: datetime | None = None,
) -> Alert | None:
    """Open the alert unless one is open already; None when it was (nothing is sent again)."""
    now = now or timezone.now()
    if Alert.objects.filter(node=node, rule=rule, workload=workload, state="open").exists():
        return None
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                node=node,
                account_id=node.account_id,
                rule=rule,
                workload=workload,
                severity=severity,
                summary=summary,
                details=details or {},
                opened_at=now,
                last_notified_at=now,
            )
            notify.notifications_queue(alert, "opened", now=now)
    except IntegrityError:  # opened by a concurrent evaluation
        return None
    log.info("alert opened: %s", alert)
    return alert


def alert_resolve(
    node: Node, rule: str, *, resolution: str, workload: str = "", now: datetime | None = None
) -> Alert | None:
    """Resolve the open alert, if there is one, and send its resolved message."""
    now = now or timezone.now()
    with transaction.atomic():
        alert = (
            Alert.objects.select_for_update()
            .filter(node=node, rule=rule, workload=workload, state="open")
            .first()
        )
        if alert is None:
            return None
        alert.state, alert.resolved_at, alert.resolution = "resolved", now, resolution
        alert.save(update_fields=["state", "resolved_at", "resolution"])
        notify.notifications_queue(alert, "resolved", now=now)
    log.info("alert resolved: %s", alert)
    return alert


def alerts_remind(*, now: datetime) -> int:
    """Send open alerts again once ALERT_REMINDER_SECONDS passed since their last message."""
    period = settings.ALERT_REMINDER_SECONDS
    if period <= 0:
        return 0
    sent = 0
    due = Alert.objects.filter(state="open", last_notified_at__lt=now - timedelta(seconds=period))
    for alert in due.select_related("node"):
        with transaction.atomic():
            if Alert.objects.filter(
                pk=alert.pk, state="open", last_notified_at=alert.last_notified_at
            ).update(last_notified_at=now):
                notify.notifications_queue(alert, "reminder", now=now)
                sent += 1
    return sent


# ---- node rules (periodic) ------------------------------------------------------------------


def _in_maintenance(node: Node, now: datetime) -> bool:
    return windows_for(node).filter(starts_at__lte=now, ends_at__gt=now).exists()


def _down_cause(node: Node) -> tuple[str, str]:
    last = node.transitions.order_by("-created", "-id").first()
    cause = last.cause if last else "unknown"
    return cause, flip_category(cause)


def _node_rules(now: datetime) -> dict[str, int]:
    counts = {"opened": 0, "resolved": 0}
    down_states = (S.DEGRADED, S.FAILED)
    open_down = set(
        Alert.objects.filter(rule=R.NODE_DOWN, state="open").values_list("node_id", flat=True)
    )
    # Down: degraded, or failed after it served (a node that never served is not "down").
    candidates = Node.objects.filter(state__in=down_states).exclude(pk__in=open_down)
    for node in candidates.select_related("account"):
        if node.state == S.FAILED and not node.transitions.filter(to_state=S.READY).exists():
            continue
        if _in_maintenance(node, now):
            continue
        cause, category = _down_cause(node)
        opened = alert_open(
            node,
            R.NODE_DOWN,
            severity=CRITICAL,
            summary=f"Node {node.name} is down ({node.state}): {cause}",
            details={"state": node.state, "cause": cause, "category": category},
            now=now,
        )
        counts["opened"] += opened is not None
    # Up again (or gone: deleting a node is no outage).
    for node in Node.objects.filter(pk__in=open_down).exclude(state__in=down_states):
        why = "the node is ready again" if node.state == S.READY else f"the node is {node.state}"
        counts["resolved"] += alert_resolve(node, R.NODE_DOWN, resolution=why, now=now) is not None
    return counts


def _errors_of(data: object) -> int | None:
    value = data.get("errors") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _agent_error_rules(now: datetime) -> dict[str, int]:
    """Compare each ready node's `errors` counter now with the oldest sample in the window (a
    counter that went down — the agent restarted — counts from zero)."""
    counts = {"opened": 0, "resolved": 0}
    window = timedelta(seconds=settings.ALERT_AGENT_ERRORS_WINDOW_SECONDS)
    slack = timedelta(seconds=max(60, 3 * settings.HEARTBEAT_SECONDS))
    oldest: dict = {}
    samples = TelemetrySample.objects.filter(
        created__gte=now - window, created__lt=now - window + slack
    ).order_by("created", "id")
    for node_id, data in samples.values_list("node_id", "data").iterator():
        oldest.setdefault(node_id, _errors_of(data))
    open_ids = set(
        Alert.objects.filter(rule=R.AGENT_ERRORS, state="open").values_list("node_id", flat=True)
    )
    nodes = Node.objects.filter(Q(state=S.READY, pk__in=oldest.keys()) | Q(pk__in=open_ids))
    for node in nodes.only("id", "name", "state", "account_id", "last_telemetry"):
        now_errors, then = _errors_of(node.last_telemetry), oldest.get(node.pk)
        if now_errors is None or then is None:
            continue
        new = now_errors - then if now_errors >= then else now_errors
        minutes = round(window.total_seconds() / 60)
        if new >= settings.ALERT_AGENT_ERRORS and node.state == S.READY:
            opened = alert_open(
                node,
                R.AGENT_ERRORS,
                severity=WARNING,
                summary=f"Node {node.name}'s agent reported {new} errors in {minutes} min",
                details={"new_errors": new, "window_seconds": int(window.total_seconds())},
                now=now,
            )
            counts["opened"] += opened is not None
        elif node.pk in open_ids and new < settings.ALERT_AGENT_ERRORS:
            resolved = alert_resolve(
                node,
                R.AGENT_ERRORS,
                resolution=f"{new} new errors in the last {minutes} min",
                now=now,
            )
            counts["resolved"] += resolved is not None
    return counts


def alerts_evaluate(*, now: datetime) -> dict[str, int]:
    """The periodic rules over the fleet, then reminders."""
    down = _node_rules(now)
    errors = _agent_error_rules(now)
    return {
        "opened": down["opened"] + errors["opened"],
        "resolved": down["resolved"] + errors["resolved"],
        "reminded": alerts_remind(now=now),
    }


# ---- benchmark rules (on each recorded run) --------------------------------------------------


def _floor(node: Node, workload: str, threshold: BenchmarkThreshold | None) -> tuple[float, str]:
    """The ops/cycle floor of this workload on this node, and where it came from; 0: none."""
    from monitoring.benchmarks import first_runs_median

    if threshold and threshold.ops_per_cycle_floor:
        return threshold.ops_per_cycle_floor, "the workload's floor (admin)"
    if settings.ALERT_OPS_PER_CYCLE_FLOOR:
        return settings.ALERT_OPS_PER_CYCLE_FLOOR, "ALERT_OPS_PER_CYCLE_FLOOR"
    share = (threshold and threshold.relative_floor) or settings.ALERT_OPS_PER_CYCLE_RELATIVE
    first = first_runs_median(node, workload)
    if not first or share <= 0:
        return 0.0, "no floor"
    return share * first, f"{share:.0%} of the node's first runs' median ({first:.3g})"


def _judge_result(node: Node, result: BenchmarkResult, now: datetime) -> None:
    from monitoring.benchmarks import workload_stats

    w = result.workload
    threshold = BenchmarkThreshold.objects.filter(workload=w).first()
    link = {"run": result.run_id, "workload": w}
    if result.correct is False:
        alert_open(
            node,
            R.INCORRECT_RESULT,
            workload=w,
            severity=CRITICAL,
            summary=f"Benchmark {w} on node {node.name} gave an INCORRECT result"
            f" (max error {result.data.get('max_error')}, tolerance"
            f" {result.data.get('tolerance')})",
            details=link,
            now=now,
        )
    elif result.correct is True:
        alert_resolve(
            node, R.INCORRECT_RESULT, workload=w, resolution="a later run was correct", now=now
        )

    if result.ops_per_cycle is not None:
        floor, source = _floor(node, w, threshold)
        if floor and result.ops_per_cycle < floor:
            alert_open(
                node,
                R.OPS_PER_CYCLE_LOW,
                workload=w,
                severity=WARNING,
                summary=f"Benchmark {w} on node {node.name}: {result.ops_per_cycle:.3g} ops/cycle,"
                f" below the floor {floor:.3g} ({source})",
                details={**link, "ops_per_cycle": result.ops_per_cycle, "floor": floor},
                now=now,
            )
        elif floor:
            alert_resolve(
                node,
                R.OPS_PER_CYCLE_LOW,
                workload=w,
                resolution=f"{result.ops_per_cycle:.3g} ops/cycle, above the floor {floor:.3g}",
                now=now,
            )

    if result.speedup is not None:
        stats = workload_stats(node, w, now=now, exclude_run_id=result.run_id)
        speedups = (stats or {}).get("speedup") or {}
        median, count = speedups.get("median"), speedups.get("count") or 0
        margin = (threshold and threshold.slower_margin) or settings.ALERT_SLOWER_MARGIN
        if median and count >= settings.ALERT_MIN_HISTORY:
            limit = median * (1 - margin)
            if result.speedup < limit:
                alert_open(
                    node,
                    R.SLOWER_THAN_MEDIAN,
                    workload=w,
                    severity=WARNING,
                    summary=f"Benchmark {w} on node {node.name} is slower than usual: speedup"
                    f" {result.speedup:.3g}x against {result.baseline or 'its baseline'} in the"
                    f" same run, {margin:.0%} or more below its 7-day median {median:.3g}x",
                    details={**link, "speedup": result.speedup, "median": median, "count": count},
                    now=now,
                )
            else:
                alert_resolve(
                    node,
                    R.SLOWER_THAN_MEDIAN,
                    workload=w,
                    resolution=f"speedup {result.speedup:.3g}x, within {margin:.0%} of its"
                    f" 7-day median {median:.3g}x",
                    now=now,
                )


def benchmark_judge(run: BenchmarkRun, *, now: datetime | None = None) -> None:
    """Apply the benchmark rules to a finished run's results."""
    now = now or timezone.now()
    for result in run.results.all():
        try:
            _judge_result(run.node, result, now)
        except Exception:  # one bad row must not hide the other workloads' alerts
            log.exception("cannot judge benchmark result %s", result.pk)


def on_benchmark_recorded(sender, run: BenchmarkRun, **_kwargs) -> None:
    if run.state == BenchmarkRun.State.DONE:
        benchmark_judge(run)
