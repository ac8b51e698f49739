import hashlib
import socket
import sys
import uuid
from pathlib import Path

import pytest

from provisioning.runner import JobSpec, Target

TEST_PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
# The interpreter the node venv is made from: the base python, not the project's venv.
NODE_PYTHON = getattr(sys, "_base_executable", sys.executable)
NODE_SECRET = "node-secret-" + uuid.uuid4().hex  # the agent's credential for its heartbeats
ACCESS_TOKEN = "access-token-" + uuid.uuid4().hex  # the customer's, for calling the agent
UNREACHABLE_CONTROL_PLANE = "http://127.0.0.1:9"


class Events:
    """on_events for run_job: keeps every batch as it came."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []

    def __call__(self, batch: list[dict]) -> None:
        self.batches.append(list(batch))

    @property
    def all(self) -> list[dict]:
        return [event for batch in self.batches for event in batch]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_target(name: str = "node-local") -> Target:
    return Target(name=name, connection="local", python=NODE_PYTHON)


def provision_vars(node_dir: Path, wheel: Path, port: int, host: str = "127.0.0.1") -> dict:
    return {
        "node_id": str(uuid.uuid4()),
        "node_dir": str(node_dir),
        "agent_host": host,
        "agent_port": port,
        "wheel_path": str(wheel),
        "node_secret": NODE_SECRET,
        "access_token_sha256": hashlib.sha256(ACCESS_TOKEN.encode()).hexdigest(),
        "control_plane_url": UNREACHABLE_CONTROL_PLANE,
        "heartbeat_seconds": 30,
        "tdp_watts": 125.0,
    }


def provision_spec(target: Target, extravars: dict) -> JobSpec:
    return JobSpec("provision.yml", target, extravars, frozenset({"node_secret"}))


def deprovision_spec(target: Target, extravars: dict) -> JobSpec:
    keep = {k: extravars[k] for k in ("node_id", "node_dir", "agent_port")}
    return JobSpec("deprovision.yml", target, keep, frozenset())


@pytest.fixture
def events() -> Events:
    return Events()
