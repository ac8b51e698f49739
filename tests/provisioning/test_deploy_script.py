"""The one-click deploy script (provisioning/deploy/install.sh): static checks, then a real run
with the node wheel against a stdlib stand-in for the control plane."""

from __future__ import annotations

import hashlib
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

from tests.runtime.fake_control_plane import (
    ACCESS_TOKEN,
    ACCESS_TOKEN_SHA256,
    NODE_ID,
    NODE_SECRET,
    FakeControlPlane,
    wait_for,
)

SCRIPT = Path(__file__).resolve().parents[2] / "provisioning" / "deploy" / "install.sh"
PLACEHOLDERS = ("@CONTROL_PLANE_URL@", "@ENROLL_SECRET@", "@WHEEL_URL@", "@WHEEL_SHA256@")
SECRET = "Xq3-enroll-secret-for-the-deploy-test"


def render(control_plane: str, wheel_url: str, wheel_sha256: str) -> str:
    text = SCRIPT.read_text()
    values = (control_plane, SECRET, wheel_url, wheel_sha256)
    for placeholder, value in zip(PLACEHOLDERS, values, strict=True):
        text = text.replace(placeholder, value)
    return text


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    # The node secret is only ever handed to the agent as a path; the enrollment secret only to
    # `vtpu enroll`.
    assert re.findall(r"\S*/node_secret\b\S*", code) == ['"$STATE_DIR/node_secret")']
    assert code.count("$ENROLL_SECRET") == 1
    assert 'VTPU_ENROLL_SECRET="$ENROLL_SECRET"' in code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, token: str | None = None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/vTPU/health")
    if token:  # the customer's access token shows more than liveness
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as reply:
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
        wheel = node_wheel.read_bytes()
        plane.files[f"/enroll/{SECRET}/install.sh"] = render(
            plane.url, f"{base}/{node_wheel.name}", sha256(wheel)
        ).encode()
        plane.files[f"/enroll/{SECRET}/{node_wheel.name}"] = wheel
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
            for name in ("state/node_secret", "state/access_token.sha256", "state/agent.json"):
                assert stat.S_IMODE((node_dir / name).stat().st_mode) == 0o600, name
            run_agent = (node_dir / "run-agent.sh").read_text()
            for flag in ("--host '127.0.0.1'", f"--port {port}", f"--node-id '{NODE_ID}'"):
                assert flag in run_agent, flag
            first_pid = int(pid_file.read_text())
            assert alive(first_pid)
            assert health(port)["status"] == "ok"
            beat = wait_for(lambda: plane.beats(), what="the node's first heartbeat")[0]
            assert beat["body"]["node_id"] == NODE_ID
            assert beat["headers"]["Authorization"] == f"Bearer {NODE_SECRET}"
            stored_hash = (node_dir / "state" / "access_token.sha256").read_text().strip()
            assert stored_hash == ACCESS_TOKEN_SHA256

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
            assert health(port, ACCESS_TOKEN)["control_plane"]["node_id"] == NODE_ID
            for output in (first, again):
                assert NODE_SECRET not in output.stdout + output.stderr
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
    assert NODE_SECRET not in (node_dir / "agent.log").read_text()


def path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH with every command of this one except `missing` (as on a minimal host)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            target = bin_dir / name
            if name not in missing and not os.path.lexists(target):  # the first on PATH wins
                target.symlink_to(os.path.join(directory, name))
    return str(bin_dir)


@pytest.mark.parametrize("checker", ["sha256sum", "python"])
def test_a_wheel_that_is_not_the_one_vouched_for_is_refused(tmp_path: Path, checker: str) -> None:
    node_dir = tmp_path / "node"
    wheel_name = "vtpu-0.1.0-py3-none-any.whl"  # no CPython tag: any Python 3.11+ will do
    served = b"PK tampered on the way"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTPU_", "PIP_"))}
    env.update(VTPU_NODE_DIR=str(node_dir), VTPU_PORT=str(free_port()))
    if checker == "python":
        env["PATH"] = path_without(tmp_path, "sha256sum")
    with FakeControlPlane() as plane:
        url = f"{plane.url}/enroll/{SECRET}/{wheel_name}"
        plane.files[f"/enroll/{SECRET}/{wheel_name}"] = served
        script = tmp_path / "install.sh"
        script.write_text(render(plane.url, url, sha256(b"PK the wheel the control plane built")))
        done = subprocess.run(
            ["sh", str(script)], capture_output=True, text=True, env=env, timeout=300
        )
        assert plane.enrollments == []
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: the downloaded {wheel_name} is not the wheel the control plane vouched" in (
        done.stderr
    )
    assert f"sha256 {sha256(served)}, expected" in done.stderr
    assert "installing the runtime" not in done.stdout
    assert not (node_dir / wheel_name).exists() and not (node_dir / f"{wheel_name}.part").exists()


def test_a_script_without_its_checksum_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "install.sh"
    script.write_text(render("http://127.0.0.1:9", "http://127.0.0.1:9/w.whl", "@WHEEL_SHA256@"))
    env = {**os.environ, "VTPU_NODE_DIR": str(tmp_path / "node")}
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "holds no valid wheel checksum" in done.stderr
    assert not (tmp_path / "node").exists()
