"""Provisioning over SSH, to an sshd in its own network namespace (see netns.py)."""

import subprocess
import time

from provisioning.runner import Target, run_job, scan_host_keys

from .conftest import NODE_PYTHON, deprovision_spec, provision_spec, provision_vars
from .test_runner import assert_no_secret, http_status, pid_alive, port_open

AGENT_PORT = 8470  # the namespace has its own ports: the default is free there


def test_it_provisions_and_removes_a_node_over_ssh(node_wheel, tmp_path, events, ssh_host, capsys):
    target = Target(
        name="node-ssh",
        connection="ssh",
        address=ssh_host.address,
        user="root",
        private_key=ssh_host.private_key,
        known_hosts=scan_host_keys(ssh_host.address),
        python=NODE_PYTHON,
    )
    assert target.known_hosts.startswith(f"{ssh_host.address} ssh-ed25519 ")
    node_dir = tmp_path / "node"
    extravars = provision_vars(node_dir, node_wheel, AGENT_PORT, host=ssh_host.address)

    began = time.monotonic()
    result = run_job(provision_spec(target, extravars), on_events=events)
    took = time.monotonic() - began
    with capsys.disabled():
        print(f"\n[provisioning] ssh: run_job start to successful in {took:.1f} s")
    assert result.status == "successful", result.explanation
    assert_no_secret(events, result)
    assert ssh_host.private_key.strip().splitlines()[1] not in result.stdout

    # Served inside the namespace, reached from here over the veth.
    assert http_status(f"http://{ssh_host.address}:{AGENT_PORT}/vTPU/health") == 200
    agent_pid = int((node_dir / "agent.pid").read_text())

    gone = run_job(deprovision_spec(target, extravars), on_events=events)
    assert gone.status == "successful", gone.explanation
    assert not pid_alive(agent_pid)
    assert not port_open(ssh_host.address, AGENT_PORT)
    assert not node_dir.exists()


def test_a_host_presenting_another_host_key_is_refused(tmp_path, events, ssh_host):
    """As if something else answered at the host's address: the pinned key is not the one the
    host presents. Nothing may run there."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other_key = (tmp_path / "other.pub").read_text().split()[:2]
    target = Target(
        name="node-ssh",
        connection="ssh",
        address=ssh_host.address,
        user="root",
        private_key=ssh_host.private_key,
        known_hosts=f"{ssh_host.address} {' '.join(other_key)}\n",
        python=NODE_PYTHON,
    )
    node_dir = tmp_path / "node"
    extravars = provision_vars(node_dir, tmp_path / "x.whl", AGENT_PORT, host=ssh_host.address)
    result = run_job(provision_spec(target, extravars), on_events=events)
    assert result.status == "failed"
    assert result.explanation.startswith(
        f"host node-ssh ({ssh_host.address}:22) did not present the SSH host key recorded for it"
    ), result.explanation
    assert "Host key verification failed" in result.explanation
    assert not node_dir.exists()
