"""The run command's bootstrap brings back the agent of every node it hosts on this machine,
not only the demo node's (the run command stops them all on Ctrl-C)."""

import time
from pathlib import Path

import pytest
from django.core.management import call_command

from fleet.models import Host, Node
from tests.platform.conftest import request_node

pytestmark = pytest.mark.django_db


def _fake_deployed(node: Node, marker: Path) -> None:
    """What the role leaves in a node's dir: a start script (here: one that leaves a mark)."""
    node_dir = Path(node.node_dir)
    node_dir.mkdir(parents=True)
    script = node_dir / "run-agent.sh"
    script.write_text(f"#!/bin/sh\necho started > {marker}\n")
    script.chmod(0o700)
    (node_dir / "agent.pid").write_text("999999999\n")  # a pid that is not running


def test_bootstrap_restarts_every_hosted_nodes_agent(staff, tmp_path, capsys, settings):
    settings.VAR_DIR = tmp_path / "var"
    host = Host.objects.create(name="this-machine", kind=Host.Kind.LOCAL, agent_host="127.0.0.1")
    first, second = request_node(staff, "one", host=host), request_node(staff, "two", host=host)
    Node.objects.filter(pk__in=[first.pk, second.pk]).update(state="degraded")
    markers = [tmp_path / "one.started", tmp_path / "two.started"]
    _fake_deployed(first, markers[0])
    _fake_deployed(second, markers[1])
    call_command("bootstrap_demo")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(m.exists() for m in markers):
        time.sleep(0.1)
    assert all(m.exists() for m in markers)
    out = capsys.readouterr().out
    assert "one" in out and "two" in out and "agent started again" in out
