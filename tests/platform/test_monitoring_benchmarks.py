"""Continuous benchmarks (monitoring.benchmarks): asked through the API or by the schedule, sent
through the heartbeat channel, the node's real suite (vtpu.bench, size tiny) coming back through
POST /api/v1/agent/heartbeat, garbage and timeouts failing the run with the reason, the schedule
under controlled time, the 7-day statistics and /metrics."""

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from fleet.models import Node, NodeAction
from monitoring import benchmarks
from monitoring.benchmarks import (
    benchmark_offset_seconds,
    benchmark_record,
    benchmark_slot_start,
    benchmarks_schedule,
    first_runs_median,
    workload_stats,
)
from monitoring.models import BenchmarkResult, BenchmarkRun
from monitoring.signals import benchmark_recorded
from tests.platform.conftest import account, api_client_for, give_secret

pytestmark = pytest.mark.django_db

HOUR = 3600
T0 = datetime(2026, 11, 2, 10, 0, 0, tzinfo=UTC)


def beat(node, secret, results=()):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    body = {"node_id": str(node.pk), "version": "0.1.0", "results": list(results)}
    return client.post("/api/v1/agent/heartbeat", body, format="json")


def benchmarks_url(node, tail=""):
    return f"/api/v1/nodes/{node.pk}/benchmarks{tail}"


@pytest.fixture
def clock(monkeypatch):
    """Controlled time: clock.now is what timezone.now() answers (and what rows are stamped
    with)."""

    class Clock:
        now = T0

        def at(self, when):
            self.now = when
            return when

        def advance(self, seconds):
            self.now += timedelta(seconds=seconds)
            return self.now

    clock = Clock()
    monkeypatch.setattr(timezone, "now", lambda: clock.now)
    return clock


@pytest.fixture
def ready(alice_node):
    """alice's node made ready by its agent's first heartbeat; (node, node secret)."""
    secret = give_secret(alice_node)
    Node.objects.filter(pk=alice_node.pk).update(state="provisioning")
    assert beat(alice_node, secret).json()["state"] == "ready"
    alice_node.refresh_from_db()
    return alice_node, secret


@pytest.fixture(scope="module")
def suite():
    """What a node's agent sends back: the real suite, tiny, as JSON (vtpu.heartbeat._finish)."""
    from vtpu import bench, jsonenc

    return json.loads(jsonenc.dumps(bench.run_suite(["gemm_256", "gather"], size="tiny")))


@pytest.fixture
def recorded():
    """Runs sent with monitoring.signals.benchmark_recorded."""
    runs = []

    def receiver(sender, run, **kwargs):
        runs.append((run.pk, run.state))

    benchmark_recorded.connect(receiver, dispatch_uid="test-recorded")
    yield runs
    benchmark_recorded.disconnect(dispatch_uid="test-recorded")


def deliver(node, secret) -> dict:
    """The next heartbeat's benchmark action for the node (the agent takes it)."""
    (action,) = [a for a in beat(node, secret).json()["actions"] if a["type"] == "benchmark"]
    return action


def answer(node, secret, action, *, ok=True, result=None, error=None):
    reply = beat(node, secret, [{"action_id": action["id"], "ok": ok, "result": result,
                                 "error": error}])  # fmt: skip
    assert reply.status_code == 200, reply.content
    assert action["id"] in reply.json()["acknowledged"]
    return reply


# ---- ingest through the real heartbeat endpoint ---------------------------------------------


def test_a_requested_benchmark_travels_through_heartbeats_and_its_workloads_are_stored(
    ready, alice_api, suite, recorded
):
    node, secret = ready
    asked = alice_api.post(
        benchmarks_url(node), {"workloads": ["gemm_256", "gather"], "size": "tiny"}, format="json"
    )
    assert asked.status_code == 201, asked.content
    run = asked.json()
    assert (run["state"], run["trigger"], run["size"], run["results"]) == (
        "pending", "customer", "tiny", [],
    )  # fmt: skip

    action = deliver(node, secret)
    assert action["workloads"] == ["gemm_256", "gather"] and action["size"] == "tiny"
    answer(node, secret, action, result=suite)

    listed = alice_api.get(benchmarks_url(node)).json()["results"]
    assert [r["id"] for r in listed] == [run["id"]]
    done = listed[0]
    assert done["state"] == "done" and done["finished_at"] and done["reason"] == ""
    assert done["machine"] == suite["machine"]
    assert [r["workload"] for r in done["results"]] == ["gemm_256", "gather"]
    for got, sent in zip(done["results"], suite["results"], strict=True):
        assert got["ops_per_second"] == sent["ops_per_second"]
        assert got["ops_per_cycle"] == sent["ops_per_cycle"]
        assert got["speedup"] == sent["speedup"] and got["baseline"] == (sent["baseline"] or "")
        assert got["correct"] == sent["correct"] and got["sources"] == sent["sources"]
        assert got["sources"], "every figure names its source"
    assert (
        BenchmarkResult.objects.get(run_id=run["id"], workload="gemm_256").data
        == (suite["results"][0])
    )
    assert recorded == [(run["id"], "done")]

    # The agent sends the result again (it missed our reply): nothing changes, no second signal.
    answer(node, secret, action, result=suite)
    assert BenchmarkResult.objects.filter(run_id=run["id"]).count() == 2
    assert recorded == [(run["id"], "done")]


def test_the_agents_refusal_fails_the_run_with_its_reason(ready, alice_api, recorded):
    node, secret = ready
    run_id = alice_api.post(benchmarks_url(node), {"workloads": ["nope"]}, format="json").json()[
        "id"
    ]
    action = deliver(node, secret)
    answer(node, secret, action, ok=False, error="unknown workloads ['nope']; valid: gemm_256")
    run = BenchmarkRun.objects.get(pk=run_id)
    assert run.state == "failed" and run.reason.startswith("unknown workloads ['nope']")
    assert not run.results.exists() and recorded == [(run_id, "failed")]


GARBAGE = [
    (None, "sent no result object"),
    ({"machine": {}}, "no list of workload results"),
    ({"results": "all good"}, "no list of workload results"),
    ({"results": []}, "holds no workload results"),
    ({"results": [7]}, "results[0] is int, not an object"),
    ({"results": [{"name": "Robert'); DROP TABLE"}]}, "no valid workload name"),
    ({"results": [{"name": "gemm_256", "speedup": "fast"}]}, "gemm_256: speedup is str"),
    ({"results": [{"name": "gemm_256", "ops_per_cycle": -2}]}, "ops_per_cycle is negative"),
    ({"results": [{"name": "gemm_256", "correct": "yes"}]}, "correct is str"),
    ({"results": [{"name": "gemm_256", "sources": ["x"]}]}, "sources is list"),
    ({"results": [{"name": "gather"}, {"name": "gather"}]}, "gather appears more than once"),
    ({"results": [{"name": "gemm_256"}] * 201}, "at most 200"),
]


@pytest.mark.parametrize(("result", "reason"), GARBAGE)
def test_garbage_from_the_node_fails_the_run_with_the_reason_never_the_heartbeat(
    ready, alice_api, result, reason
):
    node, secret = ready
    run_id = alice_api.post(benchmarks_url(node), {}, format="json").json()["id"]
    answer(node, secret, deliver(node, secret), result=result)  # 200: the heartbeat goes on
    run = BenchmarkRun.objects.get(pk=run_id)
    assert run.state == "failed" and reason in run.reason, run.reason
    assert run.reason.startswith("the node's result is not a benchmark suite")
    assert not BenchmarkResult.objects.filter(run=run).exists()
    assert Node.objects.get(pk=node.pk).state == "ready"


def test_a_result_the_database_refuses_fails_the_run_and_keeps_the_transaction(ready, suite):
    """PostgreSQL cannot store NUL in text: the savepoint keeps the heartbeat's transaction."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite stores NUL characters")
    node, _secret = ready
    run = benchmarks.benchmark_request(node=node, by=node.requested_by)
    action = NodeAction.objects.get(pk=run.action_id)
    action.completed_at, action.ok = timezone.now(), True
    bad = json.loads(json.dumps(suite))
    bad["results"][0]["error"] = "nul \x00 here"
    action.result = bad
    assert benchmark_record(action=action) is not None
    run.refresh_from_db()
    assert run.state == "failed" and "could not be stored" in run.reason
    assert not run.results.exists()
    assert Node.objects.filter(pk=node.pk).exists()  # the transaction still works


def test_a_benchmark_asked_through_the_actions_endpoint_is_recorded_too(ready, alice_api, suite):
    node, secret = ready
    posted = alice_api.post(
        f"/api/v1/nodes/{node.pk}/actions", {"type": "benchmark"}, format="json"
    )
    assert posted.status_code == 201
    # While it is out, the benchmarks endpoint knows the node is busy.
    busy = alice_api.post(benchmarks_url(node), {}, format="json")
    assert busy.status_code == 409 and "pending" in busy.json()["detail"]
    answer(node, secret, deliver(node, secret), result=suite)
    (run,) = alice_api.get(benchmarks_url(node)).json()["results"]
    assert run["state"] == "done" and run["trigger"] == "customer" and len(run["results"]) == 2


def test_a_run_with_no_result_in_time_fails_and_its_action_is_no_longer_sent(
    ready, alice_api, settings, clock, suite
):
    node, secret = ready
    settings.BENCHMARK_TIMEOUT_SECONDS = 300
    settings.BENCHMARK_INTERVAL_SECONDS = 0  # only the timeout sweep
    run_id = alice_api.post(benchmarks_url(node), {}, format="json").json()["id"]
    action = deliver(node, secret)
    assert benchmarks_schedule(now=clock.advance(299))["timed_out"] == 0
    assert benchmarks_schedule(now=clock.advance(2))["timed_out"] == 1
    run = BenchmarkRun.objects.get(pk=run_id)
    assert run.state == "failed" and run.reason == "no result within 300 s"
    settings.ACTION_RESEND_SECONDS = 0
    assert beat(node, secret).json()["actions"] == []  # given up: not sent again
    answer(node, secret, action, result=suite)  # a late result is acknowledged, changes nothing
    run.refresh_from_db()
    assert run.state == "failed" and not run.results.exists()
    assert alice_api.post(benchmarks_url(node), {}, format="json").status_code == 201


# ---- the API ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"size": "huge"}, "size"),
        ({"size": None}, "size"),
        ({"workloads": []}, "workloads"),
        ({"workloads": "gemm_256"}, "workloads"),
        ({"workloads": ["GEMM 256"]}, "workloads"),
        ({"workloads": ["x" * 51]}, "workloads"),
        ({"workloads": [f"w{i}" for i in range(51)]}, "workloads"),
    ],
)
def test_bad_requests_get_400_with_the_reason(ready, alice_api, body, field):
    node, _ = ready
    reply = alice_api.post(benchmarks_url(node), body, format="json")
    assert reply.status_code == 400 and reply.json()[field], reply.content
    assert not BenchmarkRun.objects.exists() and not NodeAction.objects.exists()


def test_an_empty_body_asks_for_the_whole_suite_at_the_default_size(ready, alice_api, settings):
    node, secret = ready
    settings.BENCHMARK_SIZE = "tiny"
    reply = alice_api.post(benchmarks_url(node), format="json")
    assert reply.status_code == 201 and reply.json()["size"] == "tiny"
    assert deliver(node, secret) == {
        "id": str(BenchmarkRun.objects.get().action_id), "type": "benchmark", "quick": True,
        "size": "tiny",
    }  # fmt: skip


def test_409_while_one_is_pending_and_for_a_node_that_is_not_ready(ready, alice_api):
    node, _ = ready
    assert alice_api.post(benchmarks_url(node), {}, format="json").status_code == 201
    again = alice_api.post(benchmarks_url(node), {}, format="json")
    assert again.status_code == 409 and "already has a benchmark pending" in again.json()["detail"]
    BenchmarkRun.objects.update(state="done")
    NodeAction.objects.update(completed_at=timezone.now())
    Node.objects.filter(pk=node.pk).update(state="degraded")
    down = alice_api.post(benchmarks_url(node), {}, format="json")
    assert down.status_code == 409 and "is degraded" in down.json()["detail"]


def test_customers_see_only_their_nodes_and_staff_any(ready, bob_api, staff):
    node, _ = ready
    for reply in (
        bob_api.get(benchmarks_url(node)),
        bob_api.post(benchmarks_url(node), {}, format="json"),
        bob_api.get(benchmarks_url(node, "/stats")),
    ):
        assert reply.status_code == 404 and "your account" in reply.json()["detail"]
    assert not BenchmarkRun.objects.exists()
    ops = api_client_for(staff)
    asked = ops.post(benchmarks_url(node), {"size": "tiny"}, format="json")
    assert asked.status_code == 201 and asked.json()["trigger"] == "staff"
    assert ops.get(benchmarks_url(node)).json()["count"] == 1
    unknown = ops.get(f"/api/v1/nodes/{uuid.uuid4()}/benchmarks")
    assert unknown.status_code == 404


def test_the_list_is_newest_first_and_paginated(ready, alice_api):
    node, _ = ready
    runs = [
        BenchmarkRun.objects.create(node=node, trigger="schedule", state="skipped", reason=str(i))
        for i in range(3)
    ]
    page = alice_api.get(benchmarks_url(node) + "?limit=2").json()
    assert page["count"] == 3 and [r["id"] for r in page["results"]] == [
        runs[2].pk, runs[1].pk,
    ]  # fmt: skip
    assert alice_api.get(benchmarks_url(node) + "?limit=0").status_code == 400


# ---- the schedule, under controlled time -----------------------------------------------------


def make_nodes(user, count, state="ready"):
    return [
        Node.objects.create(
            account=account(user),
            name=f"n{i}-{uuid.uuid4().hex[:6]}",
            state=state,
            access_token="t",
            access_token_sha256=uuid.uuid4().hex,
        )  # fmt: skip
        for i in range(count)
    ]


def runs_of(node, **filters):
    return list(BenchmarkRun.objects.filter(node=node, **filters).order_by("created", "id"))


def finish(node):
    """The node's pending runs come back done (their actions completed)."""
    for run in runs_of(node, state="pending"):
        NodeAction.objects.filter(pk=run.action_id).update(completed_at=timezone.now(), ok=True)
        BenchmarkRun.objects.filter(pk=run.pk).update(state="done", finished_at=timezone.now())


def test_offsets_spread_the_fleet_over_the_interval():
    ids = [uuid.uuid4() for _ in range(3000)]
    buckets = [0] * 6  # ten-minute buckets of an hour
    for node_id in ids:
        offset = benchmark_offset_seconds(node_id, HOUR)
        assert 0 <= offset < HOUR
        buckets[offset // 600] += 1
    assert min(buckets) > 400, buckets  # 500 each on average
    node_id = ids[0]
    start = benchmark_slot_start(node_id, T0, HOUR)
    assert start <= T0 < start + timedelta(seconds=HOUR)
    assert start.timestamp() % HOUR == benchmark_offset_seconds(node_id, HOUR)


def test_a_new_node_is_benchmarked_at_once_then_once_per_interval_at_its_offset(
    alice, settings, clock
):
    settings.BENCHMARK_INTERVAL_SECONDS, settings.BENCHMARK_SIZE = HOUR, "tiny"
    (node,) = make_nodes(alice, 1)
    assert benchmarks_schedule(now=clock.now)["requested"] == 1  # never benchmarked: at once
    (first,) = runs_of(node)
    assert (first.trigger, first.state, first.size) == ("schedule", "pending", "tiny")
    assert NodeAction.objects.get(pk=first.action_id).payload == {"quick": True, "size": "tiny"}
    finish(node)
    next_slot = benchmark_slot_start(node.pk, clock.now, HOUR) + timedelta(seconds=HOUR)
    before_slot = next_slot - timedelta(seconds=1)
    for when in (min(T0 + timedelta(seconds=60), before_slot), before_slot):
        assert benchmarks_schedule(now=clock.at(when))["requested"] == 0
    assert benchmarks_schedule(now=clock.at(next_slot))["requested"] == 1
    finish(node)
    assert benchmarks_schedule(now=clock.advance(60))["requested"] == 0  # once per slot
    later = next_slot + timedelta(seconds=HOUR + 30)
    assert benchmarks_schedule(now=clock.at(later))["requested"] == 1
    created = [r.created for r in runs_of(node)]
    assert created == [T0, next_slot, later]


def test_nodes_are_staggered_by_their_own_offsets(alice, settings, clock):
    settings.BENCHMARK_INTERVAL_SECONDS = HOUR
    nodes = make_nodes(alice, 2)
    benchmarks_schedule(now=clock.now)
    for node in nodes:
        finish(node)
    slots = sorted(
        (benchmark_slot_start(n.pk, clock.now, HOUR) + timedelta(seconds=HOUR), n.pk) for n in nodes
    )
    if slots[0][0] == slots[1][0]:
        pytest.skip("two random ids with the same offset")
    (early, early_id), (late, late_id) = slots
    assert benchmarks_schedule(now=clock.at(early))["requested"] == 1
    assert BenchmarkRun.objects.filter(created=early).get().node_id == early_id
    assert benchmarks_schedule(now=clock.at(late))["requested"] == 1
    assert BenchmarkRun.objects.filter(created=late).get().node_id == late_id


def test_busy_down_and_suspended_nodes_are_skipped_with_the_reason_once_per_slot(
    alice, settings, clock
):
    settings.BENCHMARK_INTERVAL_SECONDS = HOUR
    busy, degraded, failed, suspended = make_nodes(alice, 4)
    benchmarks_schedule(now=clock.now)  # each gets its first run
    for node in (degraded, failed, suspended):
        finish(node)  # busy's stays pending
    states = {degraded: "degraded", failed: "failed", suspended: "suspended"}
    for node, state in states.items():
        Node.objects.filter(pk=node.pk).update(state=state)
    never = make_nodes(alice, 1, state="failed")[0]  # failed provisioning: never served

    settings.BENCHMARK_TIMEOUT_SECONDS = 10 * HOUR
    cycles = [T0 + timedelta(minutes=m) for m in range(5, 175, 5)]  # every 5 minutes, ~3 h
    for when in cycles:
        benchmarks_schedule(now=clock.at(when))
    for node, reason in [
        (busy, "busy: a benchmark is still pending on the node"),
        (degraded, "down: the node is degraded"),
        (failed, "down: the node is failed"),
        (suspended, "suspended: the node is suspended"),
    ]:
        slots = sorted({benchmark_slot_start(node.pk, t, HOUR) for t in cycles} - {
            benchmark_slot_start(node.pk, T0, HOUR)
        })  # fmt: skip
        skips = runs_of(node, state="skipped")
        assert [s.reason for s in skips] == [reason] * len(slots), (node, skips)
        # One per slot: each made by the first cycle of its slot.
        assert [s.created for s in skips] == [min(t for t in cycles if t >= s) for s in slots]
        assert {(s.trigger, s.finished_at == s.created) for s in skips} == {("schedule", True)}
    assert not runs_of(never)
    assert NodeAction.objects.count() == 4  # the first runs only: nothing sent to skipped nodes


def test_an_interval_of_0_turns_the_schedule_off(alice, settings, clock):
    settings.BENCHMARK_INTERVAL_SECONDS = 0
    make_nodes(alice, 2)
    assert benchmarks_schedule(now=clock.now) == {"timed_out": 0, "requested": 0, "skipped": 0}
    assert not BenchmarkRun.objects.exists()


def test_a_cycle_costs_the_same_queries_for_2_nodes_as_for_40(alice, settings, clock):
    settings.BENCHMARK_INTERVAL_SECONDS = HOUR
    counts = []
    for count in (2, 40):
        BenchmarkRun.objects.all().delete()
        NodeAction.objects.all().delete()
        Node.objects.all().delete()
        nodes = make_nodes(alice, count)
        for node in nodes[: count // 2]:
            Node.objects.filter(pk=node.pk).update(state="degraded")
        benchmarks_schedule(now=clock.now)  # first runs (ready) and skips (degraded, once)
        for node in nodes:
            finish(node)
        with CaptureQueriesContext(connection) as queries:
            summary = benchmarks_schedule(now=clock.advance(2 * HOUR))
        assert summary["requested"] == count // 2 and summary["skipped"] == count // 2
        counts.append(len(queries))
    assert counts[0] == counts[1] and counts[0] <= 10, counts


def test_the_task_runs_one_cycle(alice, settings, clock):
    from monitoring.tasks import schedule_benchmarks

    settings.BENCHMARK_INTERVAL_SECONDS = HOUR
    make_nodes(alice, 1)
    assert schedule_benchmarks() == {"timed_out": 0, "requested": 1, "skipped": 0}


# ---- the 7-day statistics ----------------------------------------------------------------------


def add_run(node, when, figures, *, state="done", correct=True, workload="gemm_256"):
    run = BenchmarkRun.objects.create(node=node, trigger="schedule", state=state, finished_at=when)
    speedup, per_cycle, per_second = figures
    BenchmarkResult.objects.create(
        run=run, node=node, workload=workload, created=when, speedup=speedup,
        ops_per_cycle=per_cycle, ops_per_second=per_second, correct=correct,
    )  # fmt: skip
    return run


def test_the_7_day_statistics_per_workload(ready, alice_api, clock):
    node, _ = ready
    now = clock.now
    add_run(node, now - timedelta(days=8), (9.0, 9.0, 9.0))  # too old
    add_run(node, now - timedelta(days=6), (1.0, 10.0, 100.0))
    add_run(node, now - timedelta(days=3), (2.0, 20.0, 200.0))
    add_run(node, now - timedelta(days=2), (3.0, None, 300.0))
    last = add_run(node, now - timedelta(hours=1), (4.0, 40.0, 400.0))
    add_run(node, now - timedelta(hours=2), (0.1, 0.1, 0.1), correct=False)  # wrong: left out
    add_run(node, now - timedelta(hours=3), (0.1, 0.1, 0.1), state="failed")
    add_run(node, now - timedelta(hours=1), (5.0, 50.0, None), workload="gather")

    reply = alice_api.get(benchmarks_url(node, "/stats"))
    assert reply.status_code == 200
    body = reply.json()
    assert body["days"] == 7 and body["node"] == str(node.pk)
    gather, gemm = body["workloads"]  # by name
    assert gemm["workload"] == "gemm_256" and gemm["count"] == 4
    assert gemm["speedup"] == {"count": 4, "median": 2.5, "p25": 1.75, "p75": 3.25, "min": 1.0,
                               "max": 4.0}  # fmt: skip
    assert gemm["ops_per_cycle"]["count"] == 3 and gemm["ops_per_cycle"]["median"] == 20.0
    assert gather["ops_per_second"] is None and gather["speedup"]["median"] == 5.0
    assert alice_api.get(benchmarks_url(node, "/stats?days=1")).json()["workloads"][0]["count"] == 1
    assert alice_api.get(benchmarks_url(node, "/stats?days=91")).status_code == 400

    stats = workload_stats(node, "gemm_256", now=now, exclude_run_id=last.pk)
    assert stats["count"] == 3 and stats["speedup"]["median"] == 2.0
    assert workload_stats(node, "topk_cosine", now=now) is None
    assert first_runs_median(node, "gemm_256") == 10.0  # 9, 10, 20 (the None is not counted)
    assert first_runs_median(node, "gemm_256", runs=1) == 9.0
    assert first_runs_median(node, "topk_cosine") is None


# ---- /metrics ----------------------------------------------------------------------------------


def test_metrics_show_each_nodes_last_run_per_workload(ready, client, settings, clock):
    node, _ = ready
    settings.METRICS_TOKEN = "scrape-me"
    add_run(node, clock.now - timedelta(hours=2), (1.0, 10.0, 1.0))
    last = add_run(node, clock.now - timedelta(hours=1), (2.0, None, 2.0), correct=False)
    BenchmarkResult.objects.create(
        run=last, node=node, workload="gather", created=last.finished_at, speedup=None,
        ops_per_cycle=3.0, correct=None,
    )  # fmt: skip
    text = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").content.decode()
    values = {
        (s.name, s.labels["workload"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vtpu_node_benchmark_")
        and s.labels
        == {
            "node": str(node.pk),
            "account": str(node.account_id),
            "workload": s.labels["workload"],
        }  # fmt: skip
    }
    assert values == {
        ("vtpu_node_benchmark_speedup_ratio", "gemm_256"): 2.0,
        ("vtpu_node_benchmark_correct", "gemm_256"): 0.0,
        ("vtpu_node_benchmark_ops_per_cycle", "gather"): 3.0,
    }


def test_a_customers_run_neither_moves_the_schedule_nor_runs_next_to_it(
    ready, alice_api, settings, clock
):
    node, _ = ready
    settings.BENCHMARK_INTERVAL_SECONDS = HOUR
    asked = alice_api.post(benchmarks_url(node), {"workloads": ["gather"]}, format="json")
    assert asked.status_code == 201
    # Pending: the node is busy, so its first scheduled run waits (skipped, with the reason).
    assert benchmarks_schedule(now=clock.advance(60)) == {
        "timed_out": 0, "requested": 0, "skipped": 1,
    }  # fmt: skip
    assert runs_of(node, trigger="schedule")[0].reason.startswith("busy")
    finish(node)
    # Back: the schedule's own first run (the whole suite, its baseline) goes out at once.
    assert benchmarks_schedule(now=clock.advance(60))["requested"] == 1
    assert [r.state for r in runs_of(node, trigger="schedule")] == ["skipped", "pending"]


# ---- the admin -------------------------------------------------------------------------------


def test_staff_see_runs_with_their_results_and_ask_for_more_in_the_admin(ready, staff, suite):
    from django.test import Client

    node, secret = ready
    run = benchmarks.benchmark_request(node=node, by=staff, size="tiny")
    answer(node, secret, deliver(node, secret), result=suite)
    client = Client()
    client.force_login(staff)
    for page in (
        "monitoring/benchmarkrun/",
        "monitoring/benchmarkrun/?state__exact=done",
        f"monitoring/benchmarkrun/{run.pk}/change/",
        "monitoring/benchmarkthreshold/",
        "monitoring/benchmarkthreshold/add/",
    ):
        assert client.get(f"/admin/{page}").status_code == 200, page
    assert "gemm_256" in client.get(f"/admin/monitoring/benchmarkrun/{run.pk}/change/").text
    client.post(
        "/admin/monitoring/benchmarkrun/",
        {"action": "benchmark_again", "_selected_action": [run.pk]},
    )
    again = BenchmarkRun.objects.filter(node=node).exclude(pk=run.pk).get()
    assert (again.state, again.trigger, again.requested_by) == ("pending", "staff", staff)
