"""`vtpu enroll` as a real process against a stdlib stand-in for the control plane."""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.fake_control_plane import (
    ACCESS_TOKEN,
    ACCESS_TOKEN_SHA256,
    NODE_ID,
    NODE_SECRET,
    FakeControlPlane,
    wait_for,
)
from tests.runtime.test_agent import call, start_agent, stop_agent
from tests.runtime.test_cli import assert_one_line_error

SECRET = "enroll-secret-0123456789abcdef"


@pytest.fixture
def plane() -> Iterator[FakeControlPlane]:
    with FakeControlPlane() as fake:
        yield fake


def enroll(control_plane: str, node_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vtpu", "enroll", "--control-plane", control_plane]
        + ["--secret", SECRET, "--node-dir", str(node_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_it_writes_the_node_secret_the_token_hash_and_the_config_owner_only(
    plane: FakeControlPlane, tmp_path: Path
) -> None:
    result = enroll(plane.url + "/", tmp_path, "--port", "8555", "--hostname", "box-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{NODE_ID}\n"
    (call,) = plane.enrollments
    assert call["body"] == {
        "secret": SECRET,
        "hostname": "box-1",
        "agent_url": "http://127.0.0.1:8555",
        "port": 8555,
    }
    assert "Authorization" not in call["headers"]

    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("agent.json", "node_secret", "access_token.sha256"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert (state / "node_secret").read_text().strip() == NODE_SECRET
    assert (state / "access_token.sha256").read_text().strip() == ACCESS_TOKEN_SHA256
    config = json.loads((state / "agent.json").read_text())
    assert config == {
        "host": "127.0.0.1",
        "port": 8555,
        "control_plane": plane.url,
        "node_id": NODE_ID,
        "heartbeat_seconds": 7,
        "token_sha256": ACCESS_TOKEN_SHA256,
        "node_secret_sha256": hashlib.sha256(NODE_SECRET.encode()).hexdigest(),
        "public_url": "http://127.0.0.1:8555",
    }
    assert NODE_SECRET not in result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_a_second_run_says_already_enrolled_without_calling(
    plane: FakeControlPlane, tmp_path: Path
) -> None:
    assert enroll(plane.url, tmp_path).returncode == 0
    again = enroll(plane.url, tmp_path)
    assert again.returncode == 0
    assert f"already enrolled as {NODE_ID}" in again.stderr
    assert again.stdout == f"{NODE_ID}\n"
    assert len(plane.enrollments) == 1


def test_the_agent_starts_heartbeating_from_what_enroll_wrote(
    plane: FakeControlPlane, tmp_path: Path
) -> None:
    assert enroll(plane.url, tmp_path).returncode == 0
    running = start_agent(tmp_path / "state")  # --port 0; the rest comes from agent.json
    try:
        beat = wait_for(lambda: plane.beats(), what="a heartbeat")[0]
        # The access token the control plane holds works; the node secret is no API token.
        assert running.token is None  # nothing printed: the hash came with the enrollment
        assert call(running, "GET", "/vTPU/telemetry", token=ACCESS_TOKEN)[0] == 200
        assert call(running, "GET", "/vTPU/telemetry", token=NODE_SECRET)[0] == 401
    finally:
        stop_agent(running)
    assert beat["headers"]["Authorization"] == f"Bearer {NODE_SECRET}"
    assert ACCESS_TOKEN not in json.dumps(beat)
    assert beat["body"]["node_id"] == NODE_ID
    assert NODE_SECRET not in running.log()
    config = json.loads((tmp_path / "state" / "agent.json").read_text())
    assert config["token_sha256"] == ACCESS_TOKEN_SHA256
    assert config["node_secret_sha256"] == hashlib.sha256(NODE_SECRET.encode()).hexdigest()


@pytest.mark.parametrize(
    ("status", "raw", "needle"),
    [
        (410, None, "this enrollment link was already used or has expired; ask for a new one"),
        (404, None, "does not know this enrollment link"),
        (500, None, "answered HTTP 500"),
        (201, b"<html>not json</html>", "not JSON"),
        (201, b'{"node_id": 5}', "without a usable node_id"),
        (201, b'{"node_id": "n", "node_secret": "xxxxxxxxxxxxxxxxxxxx"}', "access_token_sha256"),
    ],
)
def test_a_refused_enrollment_is_one_line_and_exit_2(
    plane: FakeControlPlane, tmp_path: Path, status: int, raw: bytes | None, needle: str
) -> None:
    plane.enroll_status = status
    plane.enroll_raw = raw
    result = enroll(plane.url, tmp_path)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "state" / "node_secret").exists()


def test_an_unreachable_control_plane_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = enroll(f"http://127.0.0.1:{port}", tmp_path)
    assert_one_line_error(result, "cannot reach", f"127.0.0.1:{port}")


def test_it_rejects_a_url_that_is_not_http(tmp_path: Path) -> None:
    assert_one_line_error(enroll("ftp://example.org", tmp_path), "--control-plane")
