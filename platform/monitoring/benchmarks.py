"""Continuous benchmarks of every node (docs/architecture.md, "Continuous benchmarks").

A benchmark travels through the node's action channel (a `benchmark` NodeAction carried by
heartbeat replies, so NAT'ed nodes work too) and its result comes back in a later heartbeat.
This module is monitoring's side of it:

- `benchmark_request`: a customer's or staff's benchmark, asked through the API;
- `benchmarks_schedule`: the periodic cycle (Celery beat, every minute): every node gets one
  benchmark per BENCHMARK_INTERVAL_SECONDS at a fixed offset derived from its id (staggered), a
  node never benchmarked is due at once, a node that is busy, down or suspended when its slot
  comes gets a `skipped` run with the reason, once per slot; runs with no result within
  BENCHMARK_TIMEOUT_SECONDS fail. A constant number of queries, however many nodes;
- `benchmark_record`: the result, when fleet's `action_completed` signal says it arrived: the
  run becomes done (one BenchmarkResult per workload) or failed with the reason, then
  `monitoring.signals.benchmark_recorded` is sent. Nothing the node sends can break its
  heartbeat: a result that is not a benchmark suite fails the run with the reason;
- reads: a node's runs, its per-workload 7-day statistics (`workload_stats`, also for the alert
  rules) and the median of its first runs (`first_runs_median`, the alert rules' relative floor).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Prefetch, QuerySet, Subquery
from django.utils import timezone

from accounts.models import User
from fleet.models import Node, NodeAction, NodeState
from fleet.services.agents import finite_number
from fleet.services.nodes import (
    node_action_request,
    node_actions_expire,
    node_actions_request_many,
)
from monitoring.models import BenchmarkResult, BenchmarkRun
from monitoring.services import MonitoringError
from monitoring.signals import benchmark_recorded

log = logging.getLogger(__name__)
S = NodeState
R = BenchmarkRun.State
BENCHMARK = NodeAction.Kind.BENCHMARK

SIZES = ("tiny", "quick", "full")  # vtpu.bench.SIZES; the node refuses any other
# A workload's name as the runtime spells them (gemm_int8_1024); which names exist is the node's
# runtime's business (it answers an unknown one with the list of valid ones).
WORKLOAD_NAME = r"^[a-z][a-z0-9_]{0,49}$"
MAX_WORKLOADS = 200  # in one result: more is not a benchmark suite
FIGURES = ("speedup", "ops_per_cycle", "ops_per_second")
# pg_try_advisory_xact_lock key of the schedule cycle: one cycle at a time.
SCHEDULE_LOCK = 0x76_74_70_75_62_65_6E_63  # "vtpubenc"


class BenchmarkConflict(MonitoringError):
    status = 409


# ---- asking for one -------------------------------------------------------------------------


def _payload(size: str, workloads: list[str] | None) -> dict:
    """The action's payload, as vtpu.heartbeat's `_benchmark` reads it."""
    payload: dict[str, Any] = {"quick": size != "full", "size": size}
    if workloads is not None:
        payload["workloads"] = workloads
    return payload


def _pending(node: Node) -> BenchmarkRun | NodeAction | None:
    """The benchmark still out on the node: a pending run, or a benchmark action asked through
    POST /actions whose result has not come back."""
    run = BenchmarkRun.objects.filter(node=node, state=R.PENDING).order_by("created").first()
    if run is not None:
        return run
    return NodeAction.objects.filter(node=node, kind=BENCHMARK, completed_at__isnull=True).first()


@transaction.atomic
def benchmark_request(
    *,
    node: Node,
    by: User,
    workloads: list[str] | None = None,
    size: str | None = None,
) -> BenchmarkRun:
    """A benchmark of a ready node now, for its customer or staff; one at a time per node."""
    size = size or settings.BENCHMARK_SIZE
    if size not in SIZES:
        raise MonitoringError(f"size is one of {', '.join(SIZES)}, not {size!r}.", field="size")
    if workloads is not None:
        if not workloads:
            raise MonitoringError(
                "Name at least one workload, or leave workloads out for the whole suite.",
                field="workloads",
            )
        bad = [w for w in workloads if not isinstance(w, str) or not re.match(WORKLOAD_NAME, w)]
        if bad:
            raise MonitoringError(f"{bad[0]!r} is not a workload name.", field="workloads")
        workloads = list(dict.fromkeys(workloads))
    # The node's row is locked so two requests at once never both find no pending benchmark.
    node = Node.objects.select_for_update().get(pk=node.pk)
    if node.state != S.READY:
        raise BenchmarkConflict(
            f"Node {node.name} is {node.state}: only a ready node can be benchmarked."
        )
    pending = _pending(node)
    if pending is not None:
        what = f"run {pending.pk}" if isinstance(pending, BenchmarkRun) else f"action {pending.pk}"
        raise BenchmarkConflict(
            f"Node {node.name} already has a benchmark pending ({what}, asked at"
            f" {pending.created:%Y-%m-%d %H:%M:%S} UTC); wait for its result."
        )
    action = node_action_request(node=node, kind=BENCHMARK, payload=_payload(size, workloads))
    return BenchmarkRun.objects.create(
        node=node,
        action=action,
        trigger=BenchmarkRun.Trigger.STAFF if by.is_staff else BenchmarkRun.Trigger.CUSTOMER,
        requested_by=by,
        size=size,
    )


# ---- the schedule ---------------------------------------------------------------------------


def benchmark_offset_seconds(node_id: uuid.UUID, interval: int) -> int:
    """The node's fixed place in every interval, from its id: the fleet is spread evenly."""
    return node_id.int % interval


def benchmark_slot_start(node_id: uuid.UUID, now: datetime, interval: int) -> datetime:
    """When the node's current slot began: the last moment at its offset within an interval."""
    offset = benchmark_offset_seconds(node_id, interval)
    slot = math.floor((now.timestamp() - offset) / interval)
    return datetime.fromtimestamp(slot * interval + offset, tz=UTC)


def benchmarks_fail_overdue(*, now: datetime) -> int:
    """Runs with no result within BENCHMARK_TIMEOUT_SECONDS fail; their actions are given up,
    so they are no longer sent. Returns how many failed."""
    limit = settings.BENCHMARK_TIMEOUT_SECONDS
    overdue = list(
        BenchmarkRun.objects.filter(
            state=R.PENDING, created__lt=now - timedelta(seconds=limit)
        ).values_list("pk", "action_id")
    )
    if not overdue:
        return 0
    reason = f"no result within {limit} s"
    with transaction.atomic():
        node_actions_expire(action_ids=[a for _, a in overdue if a is not None], error=reason)
        return BenchmarkRun.objects.filter(
            pk__in=[pk for pk, _ in overdue], state=R.PENDING
        ).update(state=R.FAILED, reason=reason, finished_at=now)


def _skip_reason(state: str, busy: bool) -> str | None:
    if state == S.SUSPENDED:
        return "suspended: the node is suspended"
    if state in (S.DEGRADED, S.FAILED):
        return f"down: the node is {state}"
    if busy:
        return "busy: a benchmark is still pending on the node"
    return None


def _take_cycle_lock() -> bool:
    """One schedule cycle at a time (PostgreSQL: a transaction-scoped advisory lock; SQLite
    serialises writers anyway)."""
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [SCHEDULE_LOCK])
        return bool(cursor.fetchone()[0])


def benchmarks_schedule(*, now: datetime) -> dict:
    """One cycle of the schedule (every minute): fail overdue runs, then ask every node whose
    slot came for a benchmark, or record why it was skipped (once per slot). A node's slots count
    scheduled runs only (a customer's run of two workloads sets no baseline for the rest); a
    benchmark of any trigger still pending makes the node busy.

    A constant number of queries whatever the size of the fleet: the nodes with their latest
    scheduled run, whether the schedule ever benchmarked them and whether one is pending, in one
    SELECT; one INSERT of actions, one of runs."""
    summary = {"timed_out": benchmarks_fail_overdue(now=now), "requested": 0, "skipped": 0}
    interval = settings.BENCHMARK_INTERVAL_SECONDS
    if interval <= 0:
        return summary  # the schedule is off
    runs = BenchmarkRun.objects.filter(node=OuterRef("pk"))
    # The schedule keeps its own cadence: runs a customer or staff asked for are extra.
    scheduled = runs.filter(trigger=BenchmarkRun.Trigger.SCHEDULE)
    nodes = (
        Node.objects.filter(state__in=[S.READY, S.DEGRADED, S.FAILED, S.SUSPENDED])
        .annotate(
            last_run=Subquery(scheduled.order_by("-created").values("created")[:1]),
            benchmarked=Exists(scheduled.exclude(state=R.SKIPPED)),
            pending_run=Exists(runs.filter(state=R.PENDING)),
            pending_action=Exists(
                NodeAction.objects.filter(
                    node=OuterRef("pk"), kind=BENCHMARK, completed_at__isnull=True
                )
            ),
        )
        .values_list("pk", "state", "last_run", "benchmarked", "pending_run", "pending_action")
    )
    with transaction.atomic():
        if not _take_cycle_lock():
            summary["another_cycle_running"] = True
            return summary
        due: list[uuid.UUID] = []
        skipped: list[tuple[uuid.UUID, str]] = []
        for node_id, state, last_run, benchmarked, pending_run, pending_action in nodes:
            busy = pending_run or pending_action
            if state == S.FAILED and not benchmarked:
                continue  # never served: nothing to skip
            first = state == S.READY and not benchmarked and not busy
            if not first and last_run is not None:
                if last_run >= benchmark_slot_start(node_id, now, interval):
                    continue  # this slot is done (run, or skipped with its reason)
            reason = _skip_reason(state, busy)
            if reason is None:
                due.append(node_id)
            else:
                skipped.append((node_id, reason))
        size = settings.BENCHMARK_SIZE
        actions = node_actions_request_many(
            node_ids=due, kind=BENCHMARK, payload=_payload(size, None)
        )
        trigger = BenchmarkRun.Trigger.SCHEDULE
        BenchmarkRun.objects.bulk_create(
            [BenchmarkRun(node_id=n, action=actions[n], trigger=trigger, size=size) for n in due]
            + [
                BenchmarkRun(
                    node_id=n, trigger=trigger, state=R.SKIPPED, reason=reason, finished_at=now
                )
                for n, reason in skipped
            ]
        )
    summary["requested"], summary["skipped"] = len(due), len(skipped)
    return summary


# ---- the result -----------------------------------------------------------------------------


class BadResult(Exception):
    """What the node sent is not a benchmark suite; the message says what is wrong."""


@dataclass
class Outcome:
    state: str
    reason: str = ""
    size: str = ""
    machine: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)


def _number(entry: dict, key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadResult(f"{where}: {key} is {type(value).__name__}, not a number")
    number = finite_number(value)
    if number is not None and number < 0:
        raise BadResult(f"{where}: {key} is negative ({number:g})")
    return number


def _text(entry: dict, key: str, where: str, limit: int) -> str:
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadResult(f"{where}: {key} is {type(value).__name__}, not text")
    return value[:limit]


def _workload(entry: Any, index: int) -> dict:
    if not isinstance(entry, dict):
        raise BadResult(f"results[{index}] is {type(entry).__name__}, not an object")
    name = entry.get("name")
    if not isinstance(name, str) or not re.match(WORKLOAD_NAME, name):
        raise BadResult(f"results[{index}] has no valid workload name ({str(name)[:60]!r})")
    correct = entry.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise BadResult(f"{name}: correct is {type(correct).__name__}, not true/false/null")
    sources = entry.get("sources")
    if sources is not None and not isinstance(sources, dict):
        raise BadResult(f"{name}: sources is {type(sources).__name__}, not an object")
    return {
        "workload": name,
        **{key: _number(entry, key, name) for key in FIGURES},
        "baseline": _text(entry, "baseline", name, 100),
        "correct": correct,
        "error": _text(entry, "error", name, 10000),
        "sources": sources or {},
        "data": entry,
    }


def benchmark_outcome(action: NodeAction) -> Outcome:
    """What a completed benchmark action means for its run (pure: no database)."""
    if not action.ok:
        return Outcome(R.FAILED, action.error or "the node reported a failure without a reason")
    suite = action.result
    try:
        if not isinstance(suite, dict):
            raise BadResult("the node reported success but sent no result object")
        entries = suite.get("results")
        if not isinstance(entries, list):
            raise BadResult("the result has no list of workload results ('results')")
        if not entries:
            raise BadResult("the result holds no workload results")
        if len(entries) > MAX_WORKLOADS:
            raise BadResult(f"the result holds {len(entries)} workloads (at most {MAX_WORKLOADS})")
        results = [_workload(entry, i) for i, entry in enumerate(entries)]
        names = [r["workload"] for r in results]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BadResult(f"workload {twice[0]} appears more than once")
    except BadResult as exc:
        return Outcome(R.FAILED, f"the node's result is not a benchmark suite: {exc}")
    size = suite.get("size") if suite.get("size") in SIZES else ""
    machine = suite.get("machine") if isinstance(suite.get("machine"), dict) else {}
    return Outcome(R.DONE, size=size, machine=machine, results=results)


def _store(run: BenchmarkRun, outcome: Outcome, finished: datetime) -> bool:
    """The run's final state and its results, claimed once (only a pending run changes)."""
    fields: dict[str, Any] = {"state": outcome.state, "reason": outcome.reason[:10000]}
    fields["finished_at"] = finished
    if outcome.size:
        fields["size"] = outcome.size
    if outcome.machine:
        fields["machine"] = outcome.machine
    if not BenchmarkRun.objects.filter(pk=run.pk, state=R.PENDING).update(**fields):
        return False
    BenchmarkResult.objects.bulk_create(
        BenchmarkResult(run=run, node_id=run.node_id, created=finished, **row)
        for row in outcome.results
    )
    return True


def benchmark_record(*, action: NodeAction) -> BenchmarkRun | None:
    """Store a benchmark action's result as its run's outcome; the run, or None when it was no
    longer pending (timed out meanwhile). Never raises for anything the node sent."""
    with transaction.atomic():
        run = BenchmarkRun.objects.filter(action=action).first()
        if run is None:  # asked through POST /actions: recorded like any other benchmark
            run = BenchmarkRun.objects.create(
                node_id=action.node_id,
                action=action,
                trigger=BenchmarkRun.Trigger.CUSTOMER,
                size=str(action.payload.get("size") or "")[:10],
            )
            BenchmarkRun.objects.filter(pk=run.pk).update(created=action.created)
    finished = action.completed_at or timezone.now()
    outcome = benchmark_outcome(action)
    try:
        with transaction.atomic():  # a savepoint: a refused row must not end the heartbeat
            stored = _store(run, outcome, finished)
    except Exception as exc:  # e.g. text PostgreSQL cannot hold (NUL) in what the node sent
        log.exception("cannot store the result of benchmark run %s", run.pk)
        reason = f"the node's result could not be stored: {type(exc).__name__}: {exc}"
        with transaction.atomic():
            stored = _store(run, Outcome(R.FAILED, reason[:2000]), finished)
    if not stored:
        return None
    run.refresh_from_db()
    for receiver, error in benchmark_recorded.send_robust(sender=BenchmarkRun, run=run):
        if isinstance(error, Exception):
            log.error("%r failed on benchmark run %s", receiver, run.pk, exc_info=error)
    return run


def on_action_completed(sender, action: NodeAction, **_kwargs) -> None:
    """fleet.signals.action_completed: connected in MonitoringConfig.ready()."""
    if action.kind == BENCHMARK:
        benchmark_record(action=action)


# ---- reads ----------------------------------------------------------------------------------


def benchmark_run_list(*, node: Node) -> QuerySet[BenchmarkRun]:
    """The node's runs, newest first, each with its results in the order the node ran them."""
    return (
        BenchmarkRun.objects.filter(node=node)
        .order_by("-created", "-id")
        .prefetch_related(Prefetch("results", BenchmarkResult.objects.order_by("id")))
    )


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def figure_summary(values: list[float]) -> dict | None:
    """count, median, p25/p75 and min/max of the measured values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "median": statistics.median(ordered),
        "p25": _quantile(ordered, 0.25),
        "p75": _quantile(ordered, 0.75),
        "min": ordered[0],
        "max": ordered[-1],
    }


def _window(node: Node, *, now: datetime, days: int) -> QuerySet[BenchmarkResult]:
    """Results of the node's completed runs within `days` before `now`; incorrect results are
    left out (a wrong answer computed fast says nothing about speed)."""
    return (
        BenchmarkResult.objects.filter(
            node=node,
            run__state=R.DONE,
            created__gt=now - timedelta(days=days),
            created__lte=now,
        )
        .exclude(correct=False)
        .order_by()
    )


def _stats(rows: list[tuple]) -> dict:
    return {
        "count": len(rows),
        **{
            figure: figure_summary([r[i] for r in rows if r[i] is not None])
            for i, figure in enumerate(FIGURES, start=1)
        },
    }


def workload_stats(
    node: Node,
    workload: str,
    *,
    now: datetime,
    days: int = 7,
    exclude_run_id: int | None = None,
) -> dict | None:
    """A workload's rolling statistics on a node: {count, speedup, ops_per_cycle, ops_per_second},
    each figure {count, median, p25, p75, min, max} or None when never measured; None when the
    node has no completed result of the workload in the window."""
    results = _window(node, now=now, days=days).filter(workload=workload)
    if exclude_run_id is not None:
        results = results.exclude(run_id=exclude_run_id)
    rows = list(results.values_list("workload", *FIGURES))
    return {"workload": workload, **_stats(rows)} if rows else None


def node_benchmark_stats(node: Node, *, now: datetime, days: int = 7) -> list[dict]:
    """workload_stats of every workload the node ran in the window, by name (one query)."""
    by_workload: dict[str, list[tuple]] = {}
    for row in _window(node, now=now, days=days).values_list("workload", *FIGURES):
        by_workload.setdefault(row[0], []).append(row)
    return [{"workload": w, **_stats(rows)} for w, rows in sorted(by_workload.items())]


def first_runs_median(node: Node, workload: str, *, runs: int = 3) -> float | None:
    """The median ops/cycle of the node's first `runs` completed, correct results of the
    workload (fewer when it has fewer); None when it has none."""
    values = list(
        BenchmarkResult.objects.filter(
            node=node, workload=workload, run__state=R.DONE, ops_per_cycle__isnull=False
        )
        .exclude(correct=False)
        .order_by("created", "id")
        .values_list("ops_per_cycle", flat=True)[:runs]
    )
    return statistics.median(values) if values else None
