"""The agent's heartbeats, run for real: an agent process pointed at a stdlib stand-in for the
control plane (tests/runtime/fake_control_plane.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.fake_control_plane import NODE_ID, NODE_TOKEN, FakeControlPlane, wait_for
from tests.runtime.test_agent import ONES_PROGRAM, RunningAgent, call, call_json, stop_agent
from tests.runtime.test_agent import start_agent as _start_agent


def start_agent(state_dir: Path, control_plane: str, *args: str) -> RunningAgent:
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    token_file = state_dir.parent / "token"
    token_file.write_text(NODE_TOKEN + "\n")
    token_file.chmod(0o600)
    running = _start_agent(
        state_dir,
        "--token-file",
        str(token_file),
        "--control-plane",
        control_plane,
        "--node-id",
        NODE_ID,
        "--workers",
        "1",
        *args,
    )
    running.token = NODE_TOKEN
    return running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(agent: RunningAgent) -> dict:
    status, doc = call_json(agent, "GET", "/vTPU/health", token=None)
    assert status == 200
    return doc


@pytest.fixture(scope="module")
def plane() -> Iterator[FakeControlPlane]:
    with FakeControlPlane() as fake:
        yield fake


@pytest.fixture(scope="module")
def agent(plane: FakeControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    # 30 s on the command line: only the control plane's 0.3 s makes the beats come fast.
    running = start_agent(
        tmp_path_factory.mktemp("hb") / "state", plane.url, "--heartbeat-seconds", "30"
    )
    yield running
    stop_agent(running)
    assert NODE_TOKEN not in running.log(), "the node token leaked into the agent's log"


def test_heartbeats_carry_the_token_and_the_telemetry(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    first = wait_for(lambda: plane.beats(), what="a heartbeat")[0]
    assert first["headers"]["Authorization"] == f"Bearer {NODE_TOKEN}"
    body = first["body"]
    assert body["node_id"] == NODE_ID
    assert body["version"] == health(agent)["version"]
    assert body["agent_url"] == agent.url
    assert body["results"] == []
    assert "ops_per_cycle" in body["telemetry"]
    assert body["telemetry"]["sources"]["ops"]


def test_it_beats_as_often_as_the_reply_asks(plane: FakeControlPlane, agent: RunningAgent) -> None:
    start = len(plane.beats())
    wait_for(lambda: len(plane.beats()) >= start + 4, timeout=5, what="4 more heartbeats")
    times = [b["at"] for b in plane.beats()[-4:]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # The reply asks for a beat every 0.3 s (the default is 15 s); loose bounds for busy machines.
    assert all(0.15 < g < 5 for g in gaps), gaps


def test_health_and_metrics_show_the_channel(plane: FakeControlPlane, agent: RunningAgent) -> None:
    wait_for(lambda: plane.beats(), what="a heartbeat")
    channel = health(agent)["control_plane"]
    assert channel["url"] == plane.url
    assert channel["state"] == "ok"
    assert channel["node_state"] == "ready"
    assert channel["last_ok_at"]
    assert channel["last_error"] is None
    status, _, data = call(agent, "GET", "/metrics")
    assert status == 200
    ok = [
        ln
        for ln in data.decode().splitlines()
        if ln.startswith('vtpu_heartbeats_total{outcome="ok"}')
    ]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert "vtpu_suspended 0" in data.decode()


def test_a_benchmark_action_runs_and_its_result_comes_back(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    plane.actions.append(
        {"id": "bench-1", "type": "benchmark", "workloads": ["gemm_256"], "size": "tiny"}
    )
    result = wait_for(lambda: plane.results().get("bench-1"), timeout=60, what="bench result")
    assert result["ok"] is True, result
    assert result["error"] is None
    assert [r["name"] for r in result["result"]["results"]] == ["gemm_256"]
    assert result["result"]["size"] == "tiny"
    # Delivered once: the agent drops a result the control plane has acknowledged.
    time.sleep(1.0)
    delivered = [r for hb in plane.beats() for r in hb["body"]["results"]]
    assert [r["action_id"] for r in delivered].count("bench-1") == 1


def test_a_bad_or_unknown_action_is_reported_as_failed(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    plane.actions += [
        {"id": "odd-1", "type": "reformat-disk"},
        {"id": "bench-2", "type": "benchmark", "workloads": ["no_such_workload"]},
    ]
    odd = wait_for(lambda: plane.results().get("odd-1"), what="unknown action result")
    assert odd["ok"] is False
    assert "unknown action type 'reformat-disk'" in odd["error"]
    bad = wait_for(lambda: plane.results().get("bench-2"), what="bad benchmark result")
    assert bad["ok"] is False
    assert "no_such_workload" in bad["error"]
    assert health(agent)["status"] == "ok"


def test_suspend_refuses_programs_until_resume(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    plane.actions.append({"id": "sus-1", "type": "suspend"})
    assert wait_for(lambda: plane.results().get("sus-1"), what="suspend result")["ok"] is True
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
    )
    assert status == 503
    assert doc["error"] == "this node is suspended by the control plane"
    status, doc = call_json(agent, "POST", "/vTPU/benchmark", {"size": "tiny"})
    assert status == 503
    assert health(agent)["suspended"] is True
    assert (agent.state_dir / "suspended").exists()  # a restart keeps the node suspended

    plane.actions.append({"id": "res-1", "type": "resume"})
    assert wait_for(lambda: plane.results().get("res-1"), what="resume result")["ok"] is True
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
    )
    assert status == 200, doc
    assert doc["outputs"]["y"]["data"] == [8.0] * 6
    assert health(agent)["suspended"] is False


def test_an_unreachable_control_plane_does_not_stop_the_agent(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    running = start_agent(tmp_path / "state", dead, "--heartbeat-seconds", "0.1")
    try:
        channel = wait_for(
            lambda: (c := health(running)["control_plane"])["state"] == "unreachable" and c,
            what="state unreachable",
        )
        assert "cannot reach" in channel["last_error"]
        time.sleep(2.0)  # backoff 0.1, 0.2, 0.4, 0.8...: several failures, one log line
        status, doc = call_json(
            running, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
        )
        assert status == 200, doc
        status, _, data = call(running, "GET", "/metrics")
        errors = [ln for ln in data.decode().splitlines() if 'outcome="error"' in ln]
        assert float(errors[0].split()[-1]) >= 3
    finally:
        stop_agent(running)
    log = running.log()
    assert log.count("keeps serving and retries") == 1, log
    assert NODE_TOKEN not in log


def test_a_refused_token_is_logged_with_what_to_check(tmp_path: Path) -> None:
    with FakeControlPlane() as fake:
        fake.heartbeat_status = 401
        running = start_agent(tmp_path / "state", fake.url)
        try:
            wait_for(lambda: health(running)["control_plane"]["state"] == "rejected", what="401")
            assert health(running)["status"] == "ok"
        finally:
            stop_agent(running)
    log = running.log()
    assert "refused this node's token" in log and "token file" in log
    assert NODE_TOKEN not in log


def test_410_stops_the_heartbeats_but_not_the_agent(tmp_path: Path) -> None:
    with FakeControlPlane() as fake:
        fake.heartbeat_status = 410
        running = start_agent(tmp_path / "state", fake.url, "--heartbeat-seconds", "0.1")
        try:
            wait_for(lambda: health(running)["control_plane"]["state"] == "stopped", what="410")
            count = len(fake.beats())
            time.sleep(1.0)
            assert len(fake.beats()) == count == 1
            assert health(running)["status"] == "ok"
        finally:
            stop_agent(running)
    assert "terminated/deprovisioning; heartbeats stop" in running.log()


def test_it_refuses_a_control_plane_without_a_token_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VTPU_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "vtpu", "agent", "--port", "0", "--state-dir", str(tmp_path)]
        + ["--control-plane", "http://127.0.0.1:9", "--node-id", NODE_ID],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--token-file" in result.stderr
