"""The one-click deploy script (provisioning/deploy/install.sh): static checks, then a real run
with the node wheel against a stdlib stand-in for the control plane."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.runtime.fake_control_plane import NODE_ID, NODE_TOKEN, FakeControlPlane, wait_for

SCRIPT = Path(__file__).resolve().parents[2] / "provisioning" / "deploy" / "install.sh"
PLACEHOLDERS = ("@CONTROL_PLANE_URL@", "@ENROLL_SECRET@", "@WHEEL_URL@")
SECRET = "Xq3-enroll-secret-for-the-deploy-test"


def render(control_plane: str, wheel_url: str) -> str:
    text = SCRIPT.read_text()
    for placeholder, value in zip(PLACEHOLDERS, (control_plane, SECRET, wheel_url), strict=True):
        text = text.replace(placeholder, value)
    return text


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_it_is_valid_shell(shell: str) -> None:
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    args = [shell, "--posix", "-n"] if shell == "bash" else [shell, "-n"]
    result = subprocess.run([*args, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_it_is_a_posix_template_that_keeps_secrets_quiet() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in text
    for placeholder in PLACEHOLDERS:
        assert text.count(placeholder) == 1, placeholder
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    for bashism in ("[[", "function ", "local ", "$'", "<<<", "pipefail", "source "):
        assert bashism not in code, bashism
    # The token is only ever handed to the agent as a path; the secret only to `vtpu enroll`.
    assert re.findall(r"\S*/token\b\S*", code) == ['"$STATE_DIR/token")']
    assert code.count("$ENROLL_SECRET") == 1
    assert 'VTPU_ENROLL_SECRET="$ENROLL_SECRET"' in code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/vTPU/health", timeout=5) as reply:
        return json.loads(reply.read())


def alive(pid: int) -> bool:
    """Running (an exited agent nobody has reaped yet is a zombie: not alive)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"


def test_it_installs_enrolls_and_starts_the_agent_idempotently(
    node_wheel: Path, tmp_path: Path
) -> None:
    node_dir = tmp_path / "node"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTPU_", "PIP_"))}
    env.update(VTPU_NODE_DIR=str(node_dir), VTPU_PORT=str(port))
    python = shutil.which("python3.11") or shutil.which("python3")
    if python and subprocess.run([python, "-c", "import numpy, scipy"]).returncode == 0:
        env["VTPU_VENV_ARGS"] = "--system-site-packages"  # no numpy/scipy download in tests

    with FakeControlPlane() as plane:
        base = f"{plane.url}/enroll/{SECRET}"
        plane.files[f"/enroll/{SECRET}/install.sh"] = render(
            plane.url, f"{base}/{node_wheel.name}"
        ).encode()
        plane.files[f"/enroll/{SECRET}/{node_wheel.name}"] = node_wheel.read_bytes()
        pid_file = node_dir / "agent.pid"
        try:
            first = subprocess.run(
                ["sh", "-c", f"curl -fsSL {base}/install.sh | sh"],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
            assert first.returncode == 0, first.stdout + first.stderr
            assert "==> enrolling with" in first.stdout
            assert f"node {NODE_ID} is running" in first.stdout
            assert len(plane.enrollments) == 1
            assert plane.enrollments[0]["body"]["secret"] == SECRET
            assert plane.enrollments[0]["body"]["port"] == port
            for name in ("venv/bin/vtpu", node_wheel.name, "run-agent.sh", "agent.log"):
                assert (node_dir / name).exists(), name
            for name in ("state/token", "state/agent.json"):
                assert stat.S_IMODE((node_dir / name).stat().st_mode) == 0o600, name
            run_agent = (node_dir / "run-agent.sh").read_text()
            for flag in ("--host '127.0.0.1'", f"--port {port}", f"--node-id '{NODE_ID}'"):
                assert flag in run_agent, flag
            first_pid = int(pid_file.read_text())
            assert alive(first_pid)
            assert health(port)["status"] == "ok"
            beat = wait_for(lambda: plane.beats(), what="the node's first heartbeat")[0]
            assert beat["body"]["node_id"] == NODE_ID
            assert beat["headers"]["Authorization"] == f"Bearer {NODE_TOKEN}"

            # Again, from the saved script: no second enrollment, the agent is restarted.
            again_script = tmp_path / "install.sh"
            again_script.write_bytes(plane.files[f"/enroll/{SECRET}/install.sh"])
            again = subprocess.run(
                ["sh", str(again_script)], capture_output=True, text=True, env=env, timeout=300
            )
            assert again.returncode == 0, again.stdout + again.stderr
            assert f"already enrolled as {NODE_ID}" in again.stderr
            assert "runtime wheel already downloaded" in again.stdout
            assert len(plane.enrollments) == 1
            second_pid = int(pid_file.read_text())
            assert second_pid != first_pid
            assert not alive(first_pid)
            assert health(port)["control_plane"]["node_id"] == NODE_ID
            for output in (first, again):
                assert NODE_TOKEN not in output.stdout + output.stderr
                assert SECRET not in output.stdout + output.stderr
        finally:
            if pid_file.exists():
                pid = int(pid_file.read_text())
                if alive(pid):
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.monotonic() + 15
                    while alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
    assert NODE_TOKEN not in (node_dir / "agent.log").read_text()
