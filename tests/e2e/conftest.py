"""End-to-end fixtures: the real control plane (gunicorn, Celery worker and beat over a private
Redis, the test database), exactly as the run command starts it (controlplane.stack)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.stack import Stack, free_port, stop_local_agents


def e2e_database_url(tmp: Path, suffix: str = "") -> str:
    """A database of the end-to-end run's own: SQLite in tmp, or a fresh PostgreSQL database
    next to DATABASE_URL's (dropped afterwards) when that is PostgreSQL."""
    base = os.environ.get("DATABASE_URL", "")
    if base.startswith(("postgres://", "postgresql://")):
        import psycopg

        name = f"vtpu_e2e_{os.getpid()}{suffix}"
        admin_url = base.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return base.rsplit("/", 1)[0] + f"/{name}"
    return f"sqlite:///{tmp / 'e2e.sqlite3'}"


def drop_e2e_database(url: str) -> None:
    """The run's own PostgreSQL database goes when the run ends (SQLite lives in tmp)."""
    if not url.startswith(("postgres://", "postgresql://")):
        return
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Api:
    url: str
    token: str

    def call(self, method: str, path: str, body: dict | None = None, token: str | None = ...):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        token = self.token if token is ... else token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw.decode(errors="replace")

    def wait_for_state(self, node_id: str, states: set[str], timeout: float = 420) -> dict:
        deadline = time.monotonic() + timeout
        node: dict = {}
        while time.monotonic() < deadline:
            status, node = self.call("GET", f"/api/v1/nodes/{node_id}")
            assert status == 200, node
            if node["state"] in states:
                return node
            time.sleep(1)
        raise AssertionError(f"node {node_id} stayed {node.get('state')}, wanted {states}")


@contextlib.contextmanager
def e2e_stack(
    tmp_path_factory, node_wheel: Path, label: str, env: dict[str, str], tail: int = 40, **options
) -> Iterator[Stack]:
    """A stack of the run's own, as the run command starts it (controlplane.stack): the node
    wheel in its var dir, its own database (DATABASE_URL's server, or SQLite) and a private
    Redis (tests never touch a shared one), fast heartbeats, tiny benchmarks, plus `env`.
    Afterwards its agents stop, its database is dropped and its logs' tails are printed."""
    var = tmp_path_factory.mktemp(f"e2e-{label}")
    wheels = var / "wheels"
    wheels.mkdir()
    (wheels / node_wheel.name).write_bytes(node_wheel.read_bytes())
    stack = Stack(
        var,
        port=free_port(),
        log_to_files=True,
        env={
            "DATABASE_URL": e2e_database_url(var, f"_{label}"),
            "REDIS_URL": "",
            "HEARTBEAT_SECONDS": "2",
            "PROVISIONING_JOB_TIMEOUT": "600",
            "BENCHMARK_SIZE": "tiny",  # a new node's first scheduled benchmark takes ~1 s
            **env,
        },
        **options,
    )
    stack.env.pop("REDIS_URL")
    stack.start_private_redis()
    with stack.running():
        yield stack
    stop_local_agents(var / "nodes")  # agents of nodes a failed test left behind
    drop_e2e_database(stack.env["DATABASE_URL"])
    for log in sorted((var / "logs").glob("*.log")):
        print(f"----- {log.name} (tail)\n" + "\n".join(log.read_text().splitlines()[-tail:]))


@pytest.fixture(scope="session")
def stack(tmp_path_factory, node_wheel) -> Iterator[Stack]:
    env = {
        "REPAIR_AFTER_SECONDS": "10",  # a dead agent is repaired soon after it goes silent
        "WEBHOOK_ALLOW_PRIVATE": "true",  # the tests' webhook receivers are local
    }
    with e2e_stack(tmp_path_factory, node_wheel, "main", env) as running:
        yield running


@pytest.fixture(scope="module")
def billed(tmp_path_factory, node_wheel) -> Iterator[Stack]:
    """The stack in test mode for billing: its own local Stripe API server delivering real
    signed webhooks to it, plans created there from scratch, and this machine as its host
    (tests/e2e/test_paying_customer.py: one stack for its module, stopped after it)."""
    with e2e_stack(tmp_path_factory, node_wheel, "billing", {}, tail=30, local_stripe=True,
                   stripe_from_scratch=True) as running:  # fmt: skip
        create_host(running, "this-machine", "--local", "--ports", "19300-19309")
        yield running


def _customer(stack: Stack, username: str) -> Api:
    done = stack.manage("create_customer", username, "--token", "e2e")
    token = done.stdout.strip().splitlines()[-1].split()[-1]
    return Api(stack.url, token)


@pytest.fixture(scope="session")
def alice(stack) -> Api:
    return _customer(stack, "alice")


@pytest.fixture(scope="session")
def bob(stack) -> Api:
    return _customer(stack, "bob")


@pytest.fixture(scope="session")
def staff(stack) -> Api:
    """The operator: staff may choose the host of a node (customers get the pool's pick)."""
    done = stack.manage("create_customer", "ops", "--staff", "--quota", "50", "--token", "e2e")
    return Api(stack.url, done.stdout.strip().splitlines()[-1].split()[-1])


def create_host(stack: Stack, name: str, *args: str) -> int:
    done = stack.manage("create_host", name, *args)
    return int(re.search(r"\bid=(\d+)", done.stdout).group(1))


@pytest.fixture(scope="session")
def local_host(stack) -> int:
    return create_host(stack, "this-machine", "--local", "--ports", "19100-19199")


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    """What `check()` returns once it is truthy; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"no {what} within {timeout:g} s")


def agent_get(url: str, path: str, token: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
