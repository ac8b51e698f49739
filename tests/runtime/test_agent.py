"""The node agent over real HTTP: an agent process per module (and a few short-lived ones for
start/stop behaviour), driven with http.client and raw sockets."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

MAX_BODY = 256 * 1024
START_TIMEOUT = 30.0


@dataclass
class RunningAgent:
    proc: subprocess.Popen
    url: str
    host: str
    port: int
    token: str | None
    state_dir: Path
    log_path: Path
    stdout_lines: list[str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_agent(
    state_dir: Path,
    *args: str,
    env_token: str | None = None,
    log_name: str = "agent.log",
    launcher: tuple[str, ...] = ("-m", "vtpu"),
) -> RunningAgent:
    env = dict(os.environ)
    env.pop("VTPU_TOKEN", None)
    if env_token is not None:
        env["VTPU_TOKEN"] = env_token
    env["PYTHONUNBUFFERED"] = "1"
    log_path = state_dir.parent / log_name
    log_file = open(log_path, "wb")  # noqa: SIM115 - the process writes it while we read
    command = [*launcher, "agent", "--port", "0", "--state-dir", str(state_dir), *args]
    proc = subprocess.Popen(
        [sys.executable, *command],
        stdout=subprocess.PIPE,
        stderr=log_file,
        env=env,
        text=True,
    )
    log_file.close()
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("vTPU agent listening on"):
                # the hint line follows at once
                lines.append(proc.stdout.readline())
                break
        if proc.poll() is not None:
            break
    head = [ln for ln in lines if ln.startswith("vTPU agent listening on")]
    if not head:
        proc.kill()
        raise AssertionError(f"agent did not start: {lines}\n{log_path.read_text()}")
    m = re.match(r"vTPU agent listening on (http://([\d.]+):(\d+))(?:  token: (\S+))?", head[0])
    assert m, head[0]
    return RunningAgent(proc, m[1], m[2], int(m[3]), m[4] or env_token, state_dir, log_path, lines)


def stop_agent(agent: RunningAgent) -> int:
    if agent.proc.poll() is None:
        agent.proc.send_signal(signal.SIGTERM)
    try:
        return agent.proc.wait(15)
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
        agent.proc.stdout.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    state_dir = tmp_path_factory.mktemp("agent") / "state"
    running = start_agent(
        state_dir,
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-run-seconds",
        "2",
        "--socket-timeout",
        "1.5",
        "--workers",
        "2",
    )
    yield running
    stop_agent(running)


def call(
    agent: RunningAgent,
    method: str,
    path: str,
    body: bytes | str | dict | None = None,
    *,
    token: str | None | bool = True,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    hdrs = dict(headers or {})
    if token is True:
        token = agent.token
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if isinstance(body, dict):
        body = json.dumps(body)
        content_type = content_type or "application/json"
    if isinstance(body, str):
        body = body.encode()
    if content_type:
        hdrs["Content-Type"] = content_type
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def call_json(agent: RunningAgent, method: str, path: str, body=None, **kw) -> tuple[int, dict]:
    status, headers, data = call(agent, method, path, body, **kw)
    assert headers["Content-Type"].startswith("application/json"), (status, data)
    return status, json.loads(data)


def raw(agent: RunningAgent, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send bytes as they are and read the answer until the agent closes the connection."""
    with socket.create_connection((agent.host, agent.port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


GEMM_PROGRAM = """
.tensor a f32[3,4] input
.tensor b f32[4,5] input
.tensor bias f32[5] input
.tensor y f32[3,5] output
D.linear y, a, b, bias act=relu
C.halt
"""

ONES_PROGRAM = """
.tensor a f32[2,8] ones
.tensor b f32[8,3] ones
.tensor y f32[2,3] output
D.gemm y, a, b
C.halt
"""


def gemm_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "a": rng.standard_normal((3, 4), dtype=np.float32),
        "b": rng.standard_normal((4, 5), dtype=np.float32),
        "bias": rng.standard_normal(5, dtype=np.float32),
    }


# ---- health and authentication ------------------------------------------------------------


def test_health_without_a_token_says_only_that_it_is_up(agent: RunningAgent) -> None:
    status, doc = call_json(agent, "GET", "/vTPU/health", token=None)
    assert status == 200
    assert set(doc) == {"status", "version"}
    assert doc["status"] == "ok" and doc["version"]
    status, doc = call_json(agent, "GET", "/vTPU/health", token="a-wrong-token-0123456789")
    assert set(doc) == {"status", "version"}


def test_health_with_the_access_token_tells_more(agent: RunningAgent) -> None:
    status, doc = call_json(agent, "GET", "/vTPU/health")
    assert status == 200 and doc["status"] == "ok"
    assert doc["node_id"] is None  # standalone
    assert doc["uptime_seconds"] >= 0 and doc["suspended"] is False
    assert doc["sentrons"] == 2 and doc["control_plane"] is None


@pytest.mark.parametrize("path", ["/vTPU/telemetry", "/metrics"])
def test_it_refuses_requests_without_a_token(agent: RunningAgent, path: str) -> None:
    status, headers, data = call(agent, "GET", path, token=None)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert "token" in json.loads(data)["error"]


def test_it_refuses_programs_and_benchmarks_without_a_token(agent: RunningAgent) -> None:
    status, _ = call_json(agent, "POST", "/vTPU/programs", ONES_PROGRAM, token=None,
                          content_type="text/plain")  # fmt: skip
    assert status == 401
    status, _ = call_json(agent, "POST", "/vTPU/benchmark", {}, token=None)
    assert status == 401


@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong-token", "Bearer ", "Basic dXNlcjpwYXNz", "wrong-token", "Bearer a b"],
)
def test_it_refuses_a_wrong_token(agent: RunningAgent, authorization: str) -> None:
    status, headers, _ = call(
        agent, "GET", "/vTPU/telemetry", token=None, headers={"Authorization": authorization}
    )
    assert status == 401
    assert "Bearer" in headers["WWW-Authenticate"]


def test_the_right_token_with_any_scheme_case_is_accepted(agent: RunningAgent) -> None:
    status, _, _ = call(
        agent, "GET", "/vTPU/health", token=None, headers={"Authorization": "bearer x"}
    )
    assert status == 200
    status, _, _ = call(
        agent,
        "GET",
        "/vTPU/telemetry",
        token=None,
        headers={"Authorization": f"bearer {agent.token}"},
    )
    assert status == 200


def test_a_generated_token_is_printed_with_a_curl_line(agent: RunningAgent) -> None:
    assert agent.token and len(agent.token) >= 40
    assert any("curl" in line and agent.token in line for line in agent.stdout_lines)


def test_the_token_is_stored_only_as_its_hash(agent: RunningAgent) -> None:
    config = json.loads((agent.state_dir / "agent.json").read_text())
    digest = hashlib.sha256(agent.token.encode()).hexdigest()
    assert config["token_sha256"] == digest
    assert config["node_secret_sha256"] is None  # standalone: no control plane, no secret
    assert (agent.state_dir / "access_token.sha256").read_text() == digest + "\n"
    assert stat.S_IMODE((agent.state_dir / "access_token.sha256").stat().st_mode) == 0o600
    for path in agent.state_dir.iterdir():
        assert agent.token.encode() not in path.read_bytes(), path
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((agent.state_dir / "agent.json").stat().st_mode) == 0o600


def test_the_pid_file_names_the_running_agent(agent: RunningAgent) -> None:
    assert (agent.state_dir / "agent.pid").read_text().strip() == str(agent.proc.pid)


def test_neither_the_token_nor_a_wrong_one_reaches_the_log(agent: RunningAgent) -> None:
    call(agent, "GET", "/vTPU/telemetry")
    call(agent, "GET", "/vTPU/telemetry", token="a-wrong-secret-guess-1234")
    call(agent, "GET", "/vTPU/telemetry?token=query-secret-5678")
    time.sleep(0.2)
    log = agent.log()
    assert re.search(r"GET /vTPU/telemetry 200 [\d.]+ms", log)
    assert re.search(r"GET /vTPU/telemetry 401 [\d.]+ms", log)
    for secret in (agent.token, "a-wrong-secret-guess-1234", "query-secret-5678", "Bearer"):
        assert secret not in log


# ---- telemetry and metrics ----------------------------------------------------------------

SEED_FIELDS = {
    "ops_per_cycle",
    "cache_hit_rate",
    "throughput_gops",
    "power_watts",
    "mops_per_watt",
    "uptime_seconds",
    "errors",
}


def test_telemetry_has_the_seed_fields_and_their_sources(agent: RunningAgent) -> None:
    status, doc = call_json(agent, "GET", "/vTPU/telemetry")
    assert status == 200
    assert SEED_FIELDS <= set(doc)
    assert {"L1", "L2", "L3", "combined"} <= set(doc["cache_hit_rate"])
    assert isinstance(doc["sources"], dict) and doc["sources"]


def metric_families(agent: RunningAgent) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, data = call(agent, "GET", "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(data.decode())}


def metric_value(agent: RunningAgent, sample_name: str, **labels: str) -> float:
    for family in metric_families(agent).values():
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return sample.value
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_metrics_parse_with_prometheus_client_in_base_units(agent: RunningAgent) -> None:
    families = metric_families(agent)
    assert families and all(name.startswith("vtpu_") for name in families)
    assert families["vtpu_ops"].type == "counter"
    assert families["vtpu_pipe_busy_seconds"].type == "counter"
    assert metric_value(agent, "vtpu_sentrons") == 2
    assert metric_value(agent, "vtpu_suspended") == 0


def test_metrics_are_prometheus_text_with_vtpu_names(agent: RunningAgent) -> None:
    status, headers, data = call(agent, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(
        r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\""
        r"(?:,[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\")*\})? "
        r"(-?[0-9.eE+-]+|NaN|[+-]Inf)$"
    )
    names = set()
    for line in data.decode().splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = sample.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        names.add(m[1])
    assert names and all(name.startswith("vtpu_") for name in names)


# ---- programs -----------------------------------------------------------------------------


def test_a_program_with_json_inputs_computes_what_numpy_does(agent: RunningAgent) -> None:
    inputs = gemm_inputs(np.random.default_rng(1))
    body = {
        "program": GEMM_PROGRAM,
        "inputs": {
            "a": inputs["a"].tolist(),  # nested lists
            "b": {"shape": [4, 5], "dtype": "f32", "data": inputs["b"].ravel().tolist()},
            "bias": {"shape": [5], "data": inputs["bias"].tolist()},
        },
    }
    status, doc = call_json(agent, "POST", "/vTPU/programs", body)
    assert status == 200, doc
    y = doc["outputs"]["y"]
    assert y["shape"] == [3, 5] and y["dtype"] == "f32"
    expected = np.maximum(inputs["a"] @ inputs["b"] + inputs["bias"], 0)
    np.testing.assert_allclose(np.array(y["data"]).reshape(3, 5), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(doc["stats"], dict)


def test_assembly_sent_as_text_runs(agent: RunningAgent) -> None:
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain; charset=utf-8"
    )
    assert status == 200, doc
    assert doc["outputs"]["y"]["data"] == [8.0] * 6


def test_binary_siw_runs_as_octet_stream_and_as_base64(agent: RunningAgent) -> None:
    from vtpu import siw

    binary = siw.encode(siw.assemble(ONES_PROGRAM))
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", binary, content_type="application/octet-stream"
    )
    assert status == 200, doc
    assert doc["outputs"]["y"]["data"] == [8.0] * 6
    body = {"program_b64": base64.b64encode(binary).decode()}
    status, doc = call_json(agent, "POST", "/vTPU/programs", body)
    assert status == 200, doc
    assert doc["outputs"]["y"]["data"] == [8.0] * 6


def test_an_overflow_comes_back_as_null_counted_in_strict_json(agent: RunningAgent) -> None:
    program = ".tensor a f32[1,2] input\n.tensor y f32[1,1] output\n.tensor b f32[2,1] ones\n"
    program += "D.gemm y, a, b\nC.halt\n"
    body = {"program": program, "inputs": {"a": [[3e38, 3e38]]}}
    status, _, data = call(agent, "POST", "/vTPU/programs", body)
    assert status == 200

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in the JSON")

    y = json.loads(data, parse_constant=refuse)["outputs"]["y"]
    assert y == {"shape": [1, 1], "dtype": "f32", "data": [None], "nonfinite": 1}


def test_telemetry_ops_grow_after_a_program_runs(agent: RunningAgent) -> None:
    def ops() -> int:
        status, doc = call_json(agent, "GET", "/vTPU/telemetry")
        assert status == 200
        found = doc.get("ops", doc.get("lifetime", {}).get("ops"))
        assert found is not None, f"no ops figure in {sorted(doc)}"
        return found

    before = ops()
    status, _ = call_json(agent, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain")
    assert status == 200
    assert ops() >= before + 2 * 2 * 8 * 3  # one 2x8 @ 8x3 GEMM: 2 ops per multiply-add


def test_a_malformed_program_gets_400_with_the_reason_and_the_word(agent: RunningAgent) -> None:
    program = ".tensor y f32[2,2] output\nD.gemm y, y, y\nD.frobnicate y\nC.halt\n"
    status, doc = call_json(agent, "POST", "/vTPU/programs", program, content_type="text/plain")
    assert status == 400
    assert doc["reason"] == "bad opcode"
    assert "frobnicate" in doc["error"]
    assert doc["word"] == 1 and doc["line"] == 3


def test_a_program_without_halt_gets_400_naming_the_last_word(agent: RunningAgent) -> None:
    program = ".tensor a f32[2,2] ones\n.tensor y f32[2,2] output\nD.gemm y, a, a\n"
    status, doc = call_json(agent, "POST", "/vTPU/programs", {"program": program})
    assert status == 400
    assert doc["word"] == 0 and "halt" in doc["error"]


def test_malformed_binary_gets_400_naming_the_header(agent: RunningAgent) -> None:
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", b"NOPE" + bytes(60),
        content_type="application/octet-stream",
    )  # fmt: skip
    assert status == 400
    assert doc["reason"] == "bad magic" and doc["word"] is None
    status, doc = call_json(agent, "POST", "/vTPU/programs", {"program_b64": "!!not base64"})
    assert status == 400 and "base64" in doc["error"]


GOOD_INPUTS = {"a": [[1.0] * 4] * 3, "b": [[1.0] * 5] * 4, "bias": [1.0] * 5}
DROP = object()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("bias", DROP, "missing"),
        ("zz", [1.0], "unknown"),
        ("a", [[1.0] * 4] * 2, "shape"),
        ("a", [[1.0] * 4, [1.0] * 3, [1.0] * 4], "rectangular"),
        ("a", [["x"] * 4] * 3, "numbers"),
        ("a", [[True] * 4] * 3, "numbers"),
        ("bias", {"shape": [5], "dtype": "i8", "data": [1] * 5}, "dtype"),
        ("bias", {"shape": [5], "dtype": "f16", "data": [1] * 5}, "dtype"),
        ("bias", {"shape": [4], "data": [1] * 5}, "shape"),
        ("bias", {"shape": [5], "data": [[1] * 5]}, "flat"),
        ("bias", {"shape": [5]}, "data"),
        ("bias", {"shape": [5], "data": [1] * 5, "stride": 2}, "unknown keys"),
        ("bias", [1e39] * 5, "range"),
        ("bias", "1,2,3", "nested lists"),
    ],
)
def test_bad_inputs_get_400_naming_the_input(
    agent: RunningAgent, name: str, value: object, says: str
) -> None:
    inputs = dict(GOOD_INPUTS)
    if value is DROP:
        del inputs[name]
    else:
        inputs[name] = value
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", {"program": GEMM_PROGRAM, "inputs": inputs}
    )
    assert status == 400, doc
    assert name in doc["error"] and says in doc["error"]


def test_an_oversized_body_gets_413_before_it_is_sent(agent: RunningAgent) -> None:
    # Only the headers go out: the agent must answer from Content-Length alone.
    head = (
        f"POST /vTPU/programs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
        f"Content-Type: text/plain\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = raw(agent, head)
    assert answer.startswith(b"HTTP/1.0 413") or answer.startswith(b"HTTP/1.1 413")
    assert b"limit" in answer
    assert time.monotonic() - started < 1.0


def test_a_program_larger_than_the_node_allows_gets_413(agent: RunningAgent) -> None:
    program = ".tensor big f32[100000,100000] output\nC.halt\n"
    status, doc = call_json(agent, "POST", "/vTPU/programs", program, content_type="text/plain")
    assert status == 413
    assert "big" in doc["error"] or "elements" in doc["error"] or "bytes" in doc["error"]


def test_a_post_without_content_length_gets_411(agent: RunningAgent) -> None:
    head = (
        f"POST /vTPU/programs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agent.token}\r\n"
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    answer = raw(agent, head)
    assert answer.split(b"\r\n", 1)[0].endswith(b"411 Length Required")
    assert b'"error"' in answer
    chunked = head.replace(
        b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert b" 411 " in raw(agent, chunked).split(b"\r\n", 1)[0]


def test_invalid_json_gets_400(agent: RunningAgent) -> None:
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", '{"program": ', content_type="application/json"
    )
    assert status == 400 and "invalid JSON" in doc["error"]
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", "[1, 2]", content_type="application/json"
    )
    assert status == 400 and "object" in doc["error"]
    status, doc = call_json(agent, "POST", "/vTPU/programs", {"program": "C.halt", "extra": 1})
    assert status == 400 and "extra" in doc["error"]


@pytest.mark.parametrize("content_type", ["text/html", "multipart/form-data", None])
def test_a_wrong_content_type_gets_415(agent: RunningAgent, content_type: str | None) -> None:
    status, doc = call_json(agent, "POST", "/vTPU/programs", "C.halt", content_type=content_type)
    assert status == 415
    assert "text/plain" in doc["error"]
    status, doc = call_json(
        agent, "POST", "/vTPU/benchmark", "{}", content_type=content_type or "text/plain"
    )
    assert status == 415


def test_an_unknown_path_gets_404(agent: RunningAgent) -> None:
    status, doc = call_json(agent, "GET", "/vTPU/nothing")
    assert status == 404 and "/vTPU/telemetry" in doc["error"]


def test_a_wrong_method_gets_405_with_allow(agent: RunningAgent) -> None:
    status, headers, data = call(agent, "DELETE", "/vTPU/telemetry")
    assert status == 405 and headers["Allow"] == "GET"
    assert "GET" in json.loads(data)["error"]
    status, headers, _ = call(agent, "GET", "/vTPU/programs")
    assert status == 405 and headers["Allow"] == "POST"


def test_garbage_on_the_socket_gets_a_json_400(agent: RunningAgent) -> None:
    answer = raw(agent, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert answer.rstrip().endswith(b"}")


def test_a_silent_client_is_disconnected_after_the_socket_timeout(agent: RunningAgent) -> None:
    with socket.create_connection((agent.host, agent.port), timeout=10) as sock:
        sock.sendall(b"POST /vTPU/programs HTTP/1.1\r\n")  # and then nothing
        started = time.monotonic()
        while sock.recv(4096):
            pass
        assert time.monotonic() - started < 5


def test_slow_programs_get_504_and_a_program_queued_behind_them_runs(
    agent: RunningAgent,
) -> None:
    slow = """
.tensor a f32[128,128] ones
.tensor y f32[128,128] output
D.gemm y, a, a | C.loop 0 count=4000000
C.halt
"""
    answers: list = []

    def post_slow() -> None:
        answers.append(call_json(agent, "POST", "/vTPU/programs", slow, content_type="text/plain"))

    started = time.monotonic()
    runners = [threading.Thread(target=post_slow) for _ in range(2)]  # the pool has 2 sentrons
    for runner in runners:
        runner.start()
    time.sleep(0.8)
    # Both sentrons are busy: this one waits in the queue (no 503) and runs when one is free.
    status, headers, data = call(
        agent, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
    )
    assert status == 200, data
    assert json.loads(data)["outputs"]["y"]["data"] == [8.0] * 6
    for runner in runners:
        runner.join(30)
    assert [status for status, _ in answers] == [504, 504]
    assert all("limit of 2 s" in doc["error"] for _, doc in answers)
    assert time.monotonic() - started < 6
    # The runs were really stopped: the agent goes back to idle instead of burning the cores.
    time.sleep(0.5)
    assert cpu_seconds_over(agent.proc.pid, 1.0) < 0.3
    # The interrupted sentrons were replaced: programs run again.
    for _ in range(3):
        status, doc = call_json(
            agent, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
        )
        assert status == 200, doc


def cpu_seconds_over(pid: int, seconds: float) -> float:
    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(seconds)
    return cpu() - before


# ---- benchmark ----------------------------------------------------------------------------


def test_benchmark_rejects_unknown_workloads_listing_the_valid_ones(agent: RunningAgent) -> None:
    from vtpu import bench

    status, doc = call_json(agent, "POST", "/vTPU/benchmark", {"workloads": ["warp-drive"]})
    assert status == 400
    assert "warp-drive" in doc["error"]
    assert doc["valid_workloads"] == list(bench.WORKLOADS)


@pytest.mark.parametrize(
    "body",
    [{"quick": "yes"}, {"repeats": 0}, {"repeats": True}, {"workloads": "gemm"}, {"size": "huge"},
     {"speed": 11}],
)  # fmt: skip
def test_benchmark_rejects_bad_options(agent: RunningAgent, body: dict) -> None:
    status, doc = call_json(agent, "POST", "/vTPU/benchmark", body)
    assert status == 400 and doc["error"]


def test_benchmark_runs_named_workloads_one_run_at_a_time(agent: RunningAgent) -> None:
    from vtpu import bench

    first = next(iter(bench.WORKLOADS))
    results: dict = {}

    def run_all() -> None:
        results["all"] = call_json(
            agent, "POST", "/vTPU/benchmark", {"size": "tiny", "repeats": 40}
        )

    runner = threading.Thread(target=run_all)
    runner.start()
    # Ask again while the first run is in flight (however fast this machine is right now). Which
    # of two racing requests takes the node is up to the scheduler: the other must get a 409.
    statuses = []
    while runner.is_alive():
        status, doc = call_json(
            agent, "POST", "/vTPU/benchmark", {"workloads": [first], "size": "tiny"}
        )
        statuses.append((status, doc))
        time.sleep(0.02)
    runner.join(300)
    statuses.append(results["all"])
    refused = [doc for status, doc in statuses if status == 409]
    assert refused and all("already running" in doc["error"] for doc in refused)
    assert {status for status, _ in statuses} <= {200, 409}
    status, doc = results["all"]
    if status == 409:  # the first lost the race: run the whole suite again, alone
        status, doc = call_json(agent, "POST", "/vTPU/benchmark", {"size": "tiny", "repeats": 1})
    assert status == 200, doc
    assert [r["name"] for r in doc["results"]] == list(bench.WORKLOADS)
    status, doc = call_json(
        agent, "POST", "/vTPU/benchmark", {"workloads": [first], "size": "tiny", "repeats": 1}
    )
    assert status == 200 and [r["name"] for r in doc["results"]] == [first]


# ---- still standing -----------------------------------------------------------------------


def test_it_still_serves_after_all_of_that(agent: RunningAgent) -> None:
    assert agent.proc.poll() is None
    status, doc = call_json(agent, "GET", "/vTPU/health", token=None)
    assert status == 200 and doc["status"] == "ok"
    status, doc = call_json(agent, "GET", "/vTPU/telemetry")
    assert status == 200
    assert "Traceback" not in agent.log()


FAULTY_AGENT = """
import sys
import vtpu.agent

def broken(self, request):
    raise RuntimeError("simulated fault in a handler")

vtpu.agent.Agent.telemetry_snapshot = broken
from vtpu.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_fault_in_a_handler_is_a_counted_500_and_the_agent_keeps_serving(
    tmp_path: Path,
) -> None:
    running = start_agent(tmp_path / "state", launcher=("-c", FAULTY_AGENT))
    try:
        for _ in range(2):
            status, doc = call_json(running, "GET", "/vTPU/telemetry")
            assert status == 500
            assert doc == {"error": "internal error in the agent; see its log"}
        assert call(running, "GET", "/vTPU/health")[0] == 200
        assert metric_value(running, "vtpu_errors_total") == 2
        log = running.log()
        assert "simulated fault in a handler" in log and "GET /vTPU/telemetry 500" in log
    finally:
        assert stop_agent(running) == 0


INT8_PROGRAM = """
.tensor a i8[2,2] input
.tensor y i32[2,2] output
D.gemm_i8 y, a, a
C.halt
"""


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [([[1, 2], [3, -4]], 200, None), ([[1.5, 2], [3, 4]], 400, "integers"),
     ([[200, 2], [3, 4]], 400, "[-128, 127]")],
)  # fmt: skip
def test_integer_inputs_must_fit_their_dtype(
    agent: RunningAgent, data: list, status: int, says: str | None
) -> None:
    got, doc = call_json(
        agent, "POST", "/vTPU/programs", {"program": INT8_PROGRAM, "inputs": {"a": data}}
    )
    assert got == status, doc
    if says:
        assert says in doc["error"] and "'a'" in doc["error"]
    else:
        a = np.array(data, dtype=np.int32)
        assert doc["outputs"]["y"] == {
            "shape": [2, 2],
            "dtype": "i32",
            "data": (a @ a).ravel().tolist(),
        }


# ---- starting and stopping ----------------------------------------------------------------


def test_sigterm_stops_the_agent_cleanly(tmp_path: Path) -> None:
    running = start_agent(tmp_path / "state", env_token="x" * 32)
    assert (running.state_dir / "agent.pid").exists()
    assert call(running, "GET", "/vTPU/health")[0] == 200
    assert stop_agent(running) == 0
    assert not (running.state_dir / "agent.pid").exists()
    with pytest.raises(OSError):
        socket.create_connection((running.host, running.port), timeout=2).close()
    assert "shutting down" in running.log()


def test_sigterm_lets_a_run_in_flight_finish(tmp_path: Path) -> None:
    running = start_agent(tmp_path / "state")
    program = ".tensor a f32[128,128] ones\n.tensor y f32[128,128] output\n"
    program += "D.gemm y, a, a | C.loop 0 count=300\nC.halt\n"
    answers: list = []
    client = threading.Thread(
        target=lambda: answers.append(
            call_json(running, "POST", "/vTPU/programs", program, content_type="text/plain")
        )
    )
    client.start()
    time.sleep(0.3)
    assert stop_agent(running) == 0
    client.join(10)
    status, doc = answers[0]
    assert status == 200 and doc["stats"]["loops_taken"] == 300
    assert not (running.state_dir / "agent.pid").exists()


def test_vtpu_token_sets_the_token_and_rotation_replaces_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = "provisioned-token-0123456789abcdef"
    first = start_agent(state, env_token=token, log_name="first.log")
    try:
        assert "token: " not in first.stdout_lines[0]  # not echoed: the operator set it
        assert call(first, "GET", "/vTPU/telemetry")[0] == 200
        assert call(first, "GET", "/vTPU/telemetry", token="x" * 40)[0] == 401
        # A second agent on the same state dir refuses to start.
        second = subprocess.run(
            [sys.executable, "-m", "vtpu", "agent", "--port", "0", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"pid {first.proc.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        assert stop_agent(first) == 0
    config = json.loads((state / "agent.json").read_text())
    assert config["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (state / "agent.json").read_text()

    rotated = start_agent(state, "--rotate-token", log_name="rotated.log")
    try:
        assert rotated.token and rotated.token != token
        assert call(rotated, "GET", "/vTPU/telemetry", token=token)[0] == 401
        assert call(rotated, "GET", "/vTPU/telemetry")[0] == 200
    finally:
        stop_agent(rotated)
    kept = start_agent(state, log_name="kept.log")
    try:
        assert "token: " not in kept.stdout_lines[0]  # the stored hash is kept, nothing shown
        assert call(kept, "GET", "/vTPU/telemetry", token=rotated.token)[0] == 200
    finally:
        stop_agent(kept)


def test_a_program_whose_output_would_be_too_large_is_refused_before_it_runs(
    agent: RunningAgent,
) -> None:
    before = metric_value(agent, "vtpu_programs_run_total")
    program = ".tensor y f32[2000,2000] output\nC.halt\n"  # 30 bytes asking for ~100 MB of JSON
    status, doc = call_json(agent, "POST", "/vTPU/programs", program, content_type="text/plain")
    assert status == 413
    assert "y f32[2000, 2000]" in doc["error"] and "bytes of JSON" in doc["error"]
    assert metric_value(agent, "vtpu_programs_run_total") == before


def test_an_access_token_file_sets_the_token(tmp_path: Path) -> None:
    token = "from-a-file-0123456789abcdef"
    token_file = tmp_path / "access_token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    running = start_agent(tmp_path / "state", "--token-file", str(token_file))
    try:
        assert "token: " + token not in "".join(running.stdout_lines)
        assert call(running, "GET", "/vTPU/telemetry", token=token)[0] == 200
        assert call(running, "GET", "/vTPU/telemetry", token="y" * 30)[0] == 401
    finally:
        assert stop_agent(running) == 0
    stored = (tmp_path / "state" / "access_token.sha256").read_text().strip()
    assert stored == hashlib.sha256(token.encode()).hexdigest()


# ---- the queue in front of the sentrons -----------------------------------------------------

SLOW_PROGRAM = """
.tensor a f32[128,128] ones
.tensor y f32[128,128] output
D.gemm y, a, a | C.loop 0 count=4000000
C.halt
"""


def test_concurrent_clients_below_the_queue_size_all_get_200(tmp_path: Path) -> None:
    running = start_agent(tmp_path / "state", "--workers", "1", "--max-queue", "16")
    try:
        answers: list = []

        def client() -> None:
            for _ in range(3):
                answers.append(
                    call(running, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain")
                )

        clients = [threading.Thread(target=client) for _ in range(8)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(60)
        assert [status for status, _, _ in answers] == [200] * 24
    finally:
        assert stop_agent(running) == 0


def test_a_full_queue_gets_503_with_retry_after(tmp_path: Path) -> None:
    running = start_agent(
        tmp_path / "state", "--workers", "1", "--max-queue", "1", "--max-run-seconds", "1.5"
    )
    try:
        answers: list = []
        slow = threading.Thread(
            target=lambda: answers.append(
                call(running, "POST", "/vTPU/programs", SLOW_PROGRAM, content_type="text/plain")
            )
        )
        slow.start()
        time.sleep(0.5)
        queued = threading.Thread(
            target=lambda: answers.append(
                call(running, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain")
            )
        )
        queued.start()
        time.sleep(0.3)
        status, headers, data = call(
            running, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
        )
        assert status == 503 and headers["Retry-After"] == "1"
        assert "wait" in json.loads(data)["error"]
        slow.join(30)
        queued.join(30)
        assert sorted(status for status, _, _ in answers) == [200, 504]
        assert metric_value(running, "vtpu_queue_refused_total") == 1
    finally:
        assert stop_agent(running) == 0


def test_a_wait_past_the_queue_deadline_gets_503(tmp_path: Path) -> None:
    running = start_agent(
        tmp_path / "state", "--workers", "1", "--queue-wait-seconds", "0.3",
        "--max-run-seconds", "1.5",
    )  # fmt: skip
    try:
        slow = threading.Thread(
            target=call,
            args=(running, "POST", "/vTPU/programs", SLOW_PROGRAM),
            kwargs={"content_type": "text/plain"},
        )
        slow.start()
        time.sleep(0.5)
        status, headers, data = call(
            running, "POST", "/vTPU/programs", ONES_PROGRAM, content_type="text/plain"
        )
        assert status == 503 and headers["Retry-After"] == "1"
        assert "within 0.3 s" in json.loads(data)["error"]
        slow.join(30)
    finally:
        assert stop_agent(running) == 0


def test_one_keep_alive_connection_serves_many_requests(agent: RunningAgent) -> None:
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=30)
    try:
        conn.request("GET", "/vTPU/health")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        for _ in range(5):
            conn.request(
                "GET", "/vTPU/telemetry", headers={"Authorization": f"Bearer {agent.token}"}
            )
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        assert conn.sock is sock  # the same connection throughout
    finally:
        conn.close()
