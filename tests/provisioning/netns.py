"""A second host for SSH tests: an sshd in its own network namespace, reached over a veth pair.

The namespace shares our filesystem and process table, so the "remote" node dir is a tmp path
and the remote python is ours; what differs is the network: the agent binds the namespace's
address, reachable from here only over the veth, and Ansible gets there only through SSH.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    namespace: str
    address: str  # inside the namespace
    gateway: str  # our end of the veth
    private_key: str  # PEM text of a key root accepts
    sshd: subprocess.Popen


class NetnsUnavailable(Exception):
    """Why an SSH host cannot be made here (a reason for pytest.skip)."""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def _free_subnet() -> int:
    used = _run("ip", "-4", "-o", "addr").stdout
    for _ in range(50):
        n = random.randint(1, 254)
        if f"10.213.{n}." not in used:
            return n
    raise NetnsUnavailable("no free 10.213.n.0/30 subnet")


def _wait_for_port(address: str, port: int, seconds: float, sshd: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sshd.poll() is not None:
            raise NetnsUnavailable(f"sshd exited with {sshd.returncode}: {sshd.stderr.read()}")
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise NetnsUnavailable(f"sshd did not listen on {address}:{port} within {seconds} s")


def start(workdir: Path) -> SshHost:
    """Namespace, veth, keys, sshd. Raises NetnsUnavailable when this machine cannot do it;
    on any failure after the namespace exists, what was made is torn down again."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if not os.path.exists(SSHD):
        raise NetnsUnavailable(f"{SSHD} missing: apt-get install -y openssh-server")
    tag = f"{random.getrandbits(24):06x}"
    namespace, veth, peer = f"vtpu-t{tag}", f"vtb{tag}", f"vtb{tag}p"
    added = _run("ip", "netns", "add", namespace)
    if added.returncode != 0:
        raise NetnsUnavailable(f"ip netns add is not permitted here: {added.stderr.strip()}")
    host = None
    try:
        n = _free_subnet()
        gateway, address = f"10.213.{n}.1", f"10.213.{n}.2"
        for cmd in (
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", peer],
            ["ip", "link", "set", peer, "netns", namespace],
            ["ip", "addr", "add", f"{gateway}/30", "dev", veth],
            ["ip", "link", "set", veth, "up"],
            ["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", namespace, "ip", "addr", "add", f"{address}/30", "dev", peer],
            ["ip", "netns", "exec", namespace, "ip", "link", "set", peer, "up"],
        ):
            done = _run(*cmd)
            if done.returncode != 0:
                raise NetnsUnavailable(f"{' '.join(cmd)}: {done.stderr.strip()}")
        for key in ("host_key", "client_key"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / key))
        shutil.copy(workdir / "client_key.pub", workdir / "authorized_keys")
        config = workdir / "sshd_config"
        config.write_text(
            f"ListenAddress {address}\n"
            "Port 22\n"
            f"HostKey {workdir / 'host_key'}\n"
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            f"PidFile {workdir / 'sshd.pid'}\n"
            "Subsystem sftp internal-sftp\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)
        sshd = subprocess.Popen(
            ["ip", "netns", "exec", namespace, SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        host = SshHost(namespace, address, gateway, (workdir / "client_key").read_text(), sshd)
        _wait_for_port(address, 22, 15, sshd)
        return host
    except BaseException:
        stop(namespace, host.sshd if host else None, veth)
        raise


def stop(namespace: str, sshd: subprocess.Popen | None, veth: str | None = None) -> None:
    """Kill everything still running in the namespace (sshd, a leftover agent), then remove it;
    removing the namespace removes its veth end and with it ours."""
    if sshd is not None and sshd.poll() is None:
        sshd.terminate()
        try:
            sshd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            sshd.kill()
    pids = _run("ip", "netns", "pids", namespace).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    _run("ip", "netns", "del", namespace)
    if veth:
        _run("ip", "link", "del", veth)  # normally gone with the namespace already
