"""Nodes elsewhere: a host reached over SSH (a network namespace of the test's own), and a
customer's own machine enrolled by the one-click deploy script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from controlplane.stack import free_port
from tests.e2e.conftest import agent_get, create_host, process_alive


def test_a_node_on_an_ssh_host_becomes_ready_and_is_deprovisioned(stack, staff, ssh_host, tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text(ssh_host.private_key)
    host = create_host(
        stack, "netns-host", "--ssh", ssh_host.address, "--ssh-key-file", str(key),
        "--agent-host", ssh_host.address, "--python", sys._base_executable,
        "--base-dir", str(tmp_path / "remote-nodes"), "--inactive",
    )  # fmt: skip
    started = time.monotonic()
    status, node = staff.call("POST", "/api/v1/nodes", {"name": "e2e-ssh", "host": host})
    assert status == 201, node
    node = staff.wait_for_state(node["id"], {"ready", "failed"})
    jobs = staff.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert node["state"] == "ready", staff.call("GET", f"/api/v1/jobs/{jobs[0]['id']}")
    print(f"\nSSH node: request to ready in {time.monotonic() - started:.1f} s")
    creds = staff.call("GET", f"/api/v1/nodes/{node['id']}/credentials")[1]
    assert creds["agent_url"].startswith(f"http://{ssh_host.address}:")
    assert agent_get(creds["agent_url"], "/vTPU/health", None)[0] == 200
    status, telemetry = agent_get(creds["agent_url"], "/vTPU/telemetry", creds["token"])
    assert status == 200 and "sources" in telemetry
    assert staff.call("DELETE", f"/api/v1/nodes/{node['id']}")[0] == 202
    staff.wait_for_state(node["id"], {"terminated"}, timeout=180)
    assert not (tmp_path / "remote-nodes" / node["id"]).exists()


def test_the_deploy_script_enrolls_this_machine_into_the_right_customer(
    stack, alice, bob, tmp_path
):
    status, enrollment = alice.call("POST", "/api/v1/enrollments")
    assert status == 201, enrollment
    assert enrollment["command"] == f"curl -fsSL {enrollment['url']} | sh"
    node_dir = tmp_path / "node"
    port = free_port()
    env = {**os.environ, "VTPU_NODE_DIR": str(node_dir), "VTPU_PORT": str(port)}
    started = time.monotonic()
    run = subprocess.run(
        ["sh", "-c", enrollment["command"]], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    try:
        deadline = time.monotonic() + 120
        mine: list = []
        while time.monotonic() < deadline and not mine:
            nodes = alice.call("GET", "/api/v1/nodes")[1]["results"]
            mine = [n for n in nodes if n["kind"] == "enrolled" and n["state"] == "ready"]
            time.sleep(0.5)
        assert mine, nodes
        print(f"\ndeploy script: enrolled and ready in {time.monotonic() - started:.1f} s")
        (node,) = mine
        assert node["id"] in run.stdout
        assert node["id"] not in str(bob.call("GET", "/api/v1/nodes")[1])
        # The link was one-time.
        again = subprocess.run(
            ["curl", "-fsS", "-o", "/dev/null", "-w", "%{http_code}", enrollment["url"]],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert again.stdout == "404"
        # Deprovisioning an enrolled node: its next heartbeat is told 410, then it is terminated.
        assert alice.call("DELETE", f"/api/v1/nodes/{node['id']}")[0] == 202
        alice.wait_for_state(node["id"], {"terminated"}, timeout=60)
    finally:
        pid_file = node_dir / "agent.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            if process_alive(pid):
                os.kill(pid, signal.SIGTERM)
        for log in Path(node_dir).glob("agent.log"):
            print(log.read_text()[-2000:])
