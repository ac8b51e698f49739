"""Fixtures of the control-plane tests: two customers (alice, bob), staff, a local host, API
clients with real tokens, and a fake Ansible runner so services run without Ansible."""

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402
import pytest  # noqa: E402

# pytest-django sets Django up itself when DJANGO_SETTINGS_MODULE is known before it starts;
# when this conftest is found later (`pytest tests`), set it up here, before test modules
# import models.
django.setup()


@pytest.fixture(autouse=True)
def _isolated_settings(settings, tmp_path):
    """Node dirs and wheels under tmp; no task ever reaches the real Redis."""
    settings.NODES_DIR = tmp_path / "nodes"
    settings.WHEEL_DIR = tmp_path / "wheels"
    settings.WHEEL_DIR.mkdir()
    (settings.WHEEL_DIR / "vtpu-0.1.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"PK fake wheel")
    settings.PUBLIC_URL = "http://cp.test"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast tests


@pytest.fixture(autouse=True)
def queued(monkeypatch):
    """Tasks queued (job ids by task name) instead of being sent to the broker."""
    from fleet import tasks

    calls: dict[str, list[int]] = {"provision_node": [], "deprovision_node": []}
    for name in calls:
        monkeypatch.setattr(getattr(tasks, name), "delay", calls[name].append)
    return calls


@pytest.fixture
def alice(db, django_user_model):
    return django_user_model.objects.create_user("alice", "alice@example.com", "pw-alice")


@pytest.fixture
def bob(db, django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", "pw-bob")


@pytest.fixture
def staff(db, django_user_model):
    return django_user_model.objects.create_user(
        "sam", "sam@example.com", "pw-staff", is_staff=True, is_superuser=True
    )


@pytest.fixture
def local_host(db):
    from fleet.models import Host

    return Host.objects.create(
        name="local", kind=Host.Kind.LOCAL, port_range_start=18000, port_range_end=18009
    )


def api_client_for(user):
    from rest_framework.test import APIClient

    from accounts.services import token_create

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_create(user=user, name='tests').secret}")
    return client


@pytest.fixture
def alice_api(alice):
    return api_client_for(alice)


@pytest.fixture
def bob_api(bob):
    return api_client_for(bob)


@pytest.fixture
def alice_node(alice, local_host):
    from fleet.services import node_request

    return node_request(customer=alice, name="alpha").node


@dataclass
class FakeRunner:
    """Stands in for provisioning.runner: records specs, plays scripted events and a result."""

    status: str = "successful"
    explanation: str = ""
    events: list = field(default_factory=list)
    raises: BaseException | None = None
    specs: list = field(default_factory=list)
    pid: int = 0
    saw_cancel: bool = False

    def module(self):
        def run_job(spec, *, on_events, cancelled=lambda: False, on_start=None):
            self.specs.append(spec)
            if on_start and self.pid:
                on_start(self.pid)
            if self.events:
                on_events(self.events)
                on_events(self.events)  # a batch delivered twice is stored once
            self.saw_cancel = cancelled()
            if self.raises:
                raise self.raises
            status = "canceled" if self.saw_cancel else self.status
            return SimpleNamespace(
                status=status,
                rc=0 if status == "successful" else 2,
                explanation=self.explanation,
                stdout="PLAY RECAP ok",
            )

        return SimpleNamespace(
            run_job=run_job, JobSpec=SimpleNamespace_factory, Target=SimpleNamespace_factory
        )


def SimpleNamespace_factory(**kwargs):  # noqa: N802 - stands in for the dataclasses
    return SimpleNamespace(**kwargs)


@pytest.fixture
def fake_runner(monkeypatch):
    from fleet import services

    runner = FakeRunner()
    monkeypatch.setattr(services, "_runner", runner.module)
    monkeypatch.setattr(services, "HEALTH_WAIT_SECONDS", 0)
    return runner
