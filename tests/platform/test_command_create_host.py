"""manage.py create_host: an SSH host is added only with its host key recorded."""

import socket

import pytest
from django.core.management import CommandError, call_command

from fleet.models import Host

pytestmark = pytest.mark.django_db

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL9hp21JDCIkiDxt5Y6SHAtINL0kx221i1NRR08pSqiy"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "id_ed25519"
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    return path


def test_an_ssh_host_whose_key_cannot_be_read_is_not_added(key_file):
    port = closed_port()
    with pytest.raises(
        CommandError, match="host not added: its SSH host key could not be recorded"
    ):
        call_command(
            "create_host", "far", "--ssh", "127.0.0.1", "--ssh-port", str(port),
            "--ssh-key-file", str(key_file),
        )  # fmt: skip
    assert not Host.objects.filter(name="far").exists()


def test_a_known_hosts_file_is_recorded_as_given(key_file, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(f"# from the host's console\n192.0.2.20 {HOST_KEY}\n")
    call_command(
        "create_host", "far", "--ssh", "192.0.2.20", "--ssh-key-file", str(key_file),
        "--known-hosts-file", str(known),
    )  # fmt: skip
    assert Host.objects.get(name="far").ssh_known_hosts == f"192.0.2.20 {HOST_KEY}\n"


def test_an_empty_known_hosts_file_is_refused(key_file, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("# nothing\n")
    with pytest.raises(CommandError, match="holds no host key"):
        call_command(
            "create_host", "far", "--ssh", "192.0.2.20", "--ssh-key-file", str(key_file),
            "--known-hosts-file", str(known),
        )  # fmt: skip


def test_an_ssh_host_whose_agents_would_listen_on_loopback_is_refused(tmp_path):
    """The control plane would health-check 127.0.0.1:port — itself, not that host."""
    key = tmp_path / "id"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(CommandError, match="loopback address"):
        call_command(
            "create_host", "far", "--ssh", "203.0.113.9", "--ssh-key-file", str(key),
            "--agent-host", "127.0.0.1",
        )  # fmt: skip
    assert not Host.objects.filter(name="far").exists()
