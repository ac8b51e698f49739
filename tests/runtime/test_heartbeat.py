"""The agent's heartbeats, run for real: an agent process pointed at a stdlib stand-in for the
control plane (tests/runtime/fake_control_plane.py)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.fake_control_plane import (
    ACCESS_TOKEN,
    NODE_ID,
    NODE_SECRET,
    FakeControlPlane,
    wait_for,
)
from tests.runtime.test_agent import (
    ONES_PROGRAM,
    RunningAgent,
    call,
    call_json,
    metric_value,
    stop_agent,
)
from tests.runtime.test_agent import start_agent as _start_agent


def start_agent(state_dir: Path, control_plane: str, *args: str) -> RunningAgent:
    """An agent as provisioning leaves it: the node secret and the access token's hash in the
    state dir, the access token itself nowhere on the node."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret_file = state_dir / "node_secret"
    secret_file.write_text(NODE_SECRET + "\n")
    secret_file.chmod(0o600)
    digest = hashlib.sha256(ACCESS_TOKEN.encode()).hexdigest()
    (state_dir / "access_token.sha256").write_text(digest + "\n")
    running = _start_agent(
        state_dir,
        "--control-plane",
        control_plane,
        "--node-id",
        NODE_ID,
        "--workers",
        "1",
        *args,
    )
    running.token = ACCESS_TOKEN
    return running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(agent: RunningAgent) -> dict:
    status, doc = call_json(agent, "GET", "/vTPU/health")
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
    log = running.log()
    assert NODE_SECRET not in log and ACCESS_TOKEN not in log, "a credential leaked into the log"


def test_heartbeats_carry_the_node_secret_and_the_telemetry(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    first = wait_for(lambda: plane.beats(), what="a heartbeat")[0]
    assert first["headers"]["Authorization"] == f"Bearer {NODE_SECRET}"
    assert ACCESS_TOKEN not in json.dumps(first)
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
    assert metric_value(agent, "vtpu_heartbeats_total", outcome="ok") >= 1
    assert metric_value(agent, "vtpu_suspended") == 0


def test_health_names_the_node_only_for_the_access_token(agent: RunningAgent) -> None:
    assert health(agent)["node_id"] == NODE_ID
    status, doc = call_json(agent, "GET", "/vTPU/health", token=None)
    assert status == 200 and set(doc) == {"status", "version"}
    status, doc = call_json(agent, "GET", "/vTPU/health", token=NODE_SECRET)
    assert set(doc) == {"status", "version"}


def test_the_node_secret_is_never_an_api_token(agent: RunningAgent) -> None:
    assert call(agent, "GET", "/vTPU/telemetry", token=NODE_SECRET)[0] == 401
    assert call(agent, "GET", "/vTPU/telemetry")[0] == 200
    config = json.loads((agent.state_dir / "agent.json").read_text())
    assert config["node_secret_sha256"] == hashlib.sha256(NODE_SECRET.encode()).hexdigest()
    assert config["token_sha256"] == hashlib.sha256(ACCESS_TOKEN.encode()).hexdigest()


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
        assert metric_value(running, "vtpu_heartbeats_total", outcome="error") >= 3
    finally:
        stop_agent(running)
    log = running.log()
    assert log.count("keeps serving and retries") == 1, log
    assert NODE_SECRET not in log


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
    assert "refused this node's secret" in log and "node secret file" in log
    assert NODE_SECRET not in log


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


def test_it_refuses_a_control_plane_without_a_node_secret(tmp_path: Path) -> None:
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
    assert "--node-secret-file" in result.stderr and "node_secret" in result.stderr


# ---- credentials and idempotent actions ------------------------------------------------------


def test_rotate_token_replaces_the_access_token_at_once(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    new_token = "rotated-access-token-0123456789"
    digest = hashlib.sha256(new_token.encode()).hexdigest()
    plane.actions += [
        {"id": "rot-bad", "type": "rotate_token", "token_sha256": "not-a-hash"},
        {"id": "rot-1", "type": "rotate_token", "token_sha256": digest},
    ]
    bad = wait_for(lambda: plane.results().get("rot-bad"), what="bad rotate result")
    assert bad["ok"] is False and "64 lowercase hex" in bad["error"]
    done = wait_for(lambda: plane.results().get("rot-1"), what="rotate result")
    assert done["ok"] is True and done["result"] == {"rotated": True}
    assert call(agent, "GET", "/vTPU/telemetry", token=ACCESS_TOKEN)[0] == 401
    assert call(agent, "GET", "/vTPU/telemetry", token=new_token)[0] == 200
    assert (agent.state_dir / "access_token.sha256").read_text().strip() == digest
    assert json.loads((agent.state_dir / "agent.json").read_text())["token_sha256"] == digest
    # Back to the module's token, for the tests that follow.
    plane.actions.append(
        {
            "id": "rot-back",
            "type": "rotate_token",
            "token_sha256": hashlib.sha256(ACCESS_TOKEN.encode()).hexdigest(),
        }
    )
    wait_for(lambda: plane.results().get("rot-back"), what="rotate back")
    assert call(agent, "GET", "/vTPU/telemetry")[0] == 200


def deliveries(plane: FakeControlPlane, action_id: str) -> list[dict]:
    return [r for hb in plane.beats() for r in hb["body"]["results"] if r["action_id"] == action_id]


def test_an_action_delivered_twice_is_applied_once_also_after_a_restart(tmp_path: Path) -> None:
    token_a, token_b = "first-rotated-token-0123456789", "second-rotated-token-0123456789"
    with FakeControlPlane() as fake:
        state = tmp_path / "state"
        running = start_agent(state, fake.url)
        try:
            fake.actions += [
                {"id": "sus-x", "type": "suspend"},
                {"id": "bench-x", "type": "benchmark", "workloads": ["gemm_256"], "size": "tiny"},
                {"id": "rot-a", "type": "rotate_token",
                 "token_sha256": hashlib.sha256(token_a.encode()).hexdigest()},
            ]  # fmt: skip
            for action_id in ("sus-x", "bench-x", "rot-a"):
                wait_for(lambda a=action_id: deliveries(fake, a), timeout=60, what=action_id)
            first_bench = deliveries(fake, "bench-x")[0]
            fake.actions += [
                {"id": "res-y", "type": "resume"},
                {"id": "rot-b", "type": "rotate_token",
                 "token_sha256": hashlib.sha256(token_b.encode()).hexdigest()},
            ]  # fmt: skip
            wait_for(lambda: deliveries(fake, "rot-b"), what="rot-b")
            # The same three again: reported again, not applied again.
            fake.actions += [
                {"id": "sus-x", "type": "suspend"},
                {"id": "bench-x", "type": "benchmark", "workloads": ["gemm_256"], "size": "tiny"},
                {"id": "rot-a", "type": "rotate_token",
                 "token_sha256": hashlib.sha256(token_a.encode()).hexdigest()},
            ]  # fmt: skip
            for action_id in ("sus-x", "bench-x", "rot-a"):
                wait_for(
                    lambda a=action_id: len(deliveries(fake, a)) >= 2, what=f"{action_id} again"
                )
            assert deliveries(fake, "bench-x")[1] == first_bench
            running.token = token_b
            assert health(running)["suspended"] is False
            assert call(running, "GET", "/vTPU/telemetry", token=token_a)[0] == 401
        finally:
            assert stop_agent(running) == 0
        assert "sus-x" in (state / "actions.json").read_text()

        # After a restart (provisioning rewrites the token hash): still done once.
        again = start_agent(state, fake.url)
        try:
            fake.actions += [{"id": "sus-x", "type": "suspend"}, {"id": "rot-a", "type": "rotate_token",
                             "token_sha256": hashlib.sha256(token_a.encode()).hexdigest()}]  # fmt: skip
            wait_for(lambda: len(deliveries(fake, "sus-x")) >= 3, what="sus-x after restart")
            wait_for(lambda: len(deliveries(fake, "rot-a")) >= 3, what="rot-a after restart")
            assert deliveries(fake, "sus-x")[-1]["result"] == {"suspended": True}
            assert health(again)["suspended"] is False
            assert call(again, "GET", "/vTPU/telemetry", token=token_a)[0] == 401
        finally:
            assert stop_agent(again) == 0


def test_load_model_makes_a_model_resident_or_says_why_not(
    plane: FakeControlPlane, agent: RunningAgent
) -> None:
    plane.actions += [
        {"id": "lm-bad", "type": "load_model", "model": "no-such-model"},
        {"id": "lm-none", "type": "load_model"},
        {"id": "lm-fp4", "type": "load_model", "model": "all-MiniLM-L6-v2", "precision": "fp4"},
        {"id": "lm-1", "type": "load_model", "model": "all-MiniLM-L6-v2", "precision": "int8"},
    ]
    bad = wait_for(lambda: plane.results().get("lm-bad"), what="unknown model result")
    assert bad["ok"] is False and "no model 'no-such-model'" in bad["error"]
    none = wait_for(lambda: plane.results().get("lm-none"), what="nameless load result")
    assert none["ok"] is False and "needs 'model'" in none["error"]
    fp4 = wait_for(lambda: plane.results().get("lm-fp4"), what="bad precision result")
    assert fp4["ok"] is False and "precision 'fp4' is not implemented" in fp4["error"]
    loaded = wait_for(lambda: plane.results().get("lm-1"), what="load result", timeout=120)
    assert loaded["ok"] is True, loaded
    assert loaded["result"]["id"] == "all-MiniLM-L6-v2"
    assert loaded["result"]["state"] == "loaded" and loaded["result"]["bytes"] > 0
    assert loaded["result"]["precision"] == "int8"
    status, listed = call_json(agent, "GET", "/vTPU/models")
    assert status == 200
    assert {m["id"]: m["state"] for m in listed["models"]}["all-MiniLM-L6-v2"] == "loaded"
    # kept in agent.json, so the agent loads it again when it restarts (vtpu.models.saved)
    saved = json.loads((agent.state_dir / "agent.json").read_text())["models"]
    assert saved == [{"name": "all-MiniLM-L6-v2", "precision": "int8"}]
    # Its work reaches the control plane: heartbeats carry the models' counts, and the agent's
    # /metrics has them too.
    body = {"model": "all-MiniLM-L6-v2", "input": ["a first sentence", "and a second one"]}
    status, answer = call_json(agent, "POST", "/v1/embeddings", body)
    assert status == 200, answer
    tokens = answer["usage"]["prompt_tokens"]

    def counted() -> dict | None:
        last = plane.beats()[-1]["body"]["telemetry"]["models"]["loaded"].get("all-MiniLM-L6-v2")
        return last if last and last["inputs"] == 2 else None

    seen = wait_for(counted, what="a heartbeat with the embeddings counted")
    assert seen["requests"] == 1 and seen["tokens"] == tokens > 4
    assert metric_value(agent, "vtpu_model_embeddings_total", model="all-MiniLM-L6-v2") == 2
    assert (
        metric_value(agent, "vtpu_model_tokens_total", model="all-MiniLM-L6-v2", kind="input")
        == tokens
    )
