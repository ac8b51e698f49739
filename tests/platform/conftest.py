"""Fixtures of the control-plane tests: two customers (alice, bob) each with an account, staff,
a local host, API clients with real tokens, and a fake Ansible runner so services run without
Ansible. Tasks are recorded instead of sent to a broker."""

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
    """Node dirs and wheels under tmp; no task ever reaches the real Redis; no throttling
    shared with other runs (tests of throttling set a Redis cache themselves)."""
    settings.NODES_DIR = tmp_path / "nodes"
    settings.WHEEL_DIR = tmp_path / "wheels"
    settings.WHEEL_DIR.mkdir()
    (settings.WHEEL_DIR / "vtpu-0.1.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"PK fake wheel")
    settings.PUBLIC_URL = "http://cp.test"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast tests
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"tests-{tmp_path.name}",
        }
    }


@pytest.fixture(autouse=True)
def queued(monkeypatch):
    """Jobs whose task was sent, by job kind ("provision_node", "deprovision_node",
    "repair_node"), instead of being sent to the broker."""
    from fleet.models import ProvisioningJob
    from fleet.services import queue

    calls: dict[str, list[int]] = {"provision_node": [], "deprovision_node": [], "repair_node": []}
    sent: list[tuple] = []

    def send_task(name, *args, **options):
        sent.append((name, args))
        if name == queue.JOB_TASK:
            kind = ProvisioningJob.objects.get(pk=args[0]).kind
            calls[f"{kind}_node"].append(args[0])
        return True

    calls["real_send_task"] = queue.send_task  # type: ignore[assignment]
    monkeypatch.setattr(queue, "send_task", send_task)
    calls["sent"] = sent  # type: ignore[assignment]
    return calls


def make_customer(username: str, *, staff: bool = False, quota: int | None = None):
    from django.contrib.auth import get_user_model

    from accounts.services import account_create

    user = get_user_model().objects.create_user(
        username, f"{username}@example.com", f"pw-{username}", is_staff=staff, is_superuser=staff
    )
    account_create(name=f"{username.title()} Co", owner=user, node_quota=quota)
    return user


@pytest.fixture
def alice(db):
    return make_customer("alice", quota=5)


@pytest.fixture
def bob(db):
    return make_customer("bob", quota=5)


@pytest.fixture
def staff(db):
    return make_customer("sam", staff=True, quota=20)


def account(user):
    return user.membership.account


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
    secret = token_create(account=account(user), user=user, name="tests").secret
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def alice_api(alice):
    return api_client_for(alice)


@pytest.fixture
def bob_api(bob):
    return api_client_for(bob)


def request_node(user, name: str, host=None):
    from fleet.services.nodes import node_request

    return node_request(account=account(user), user=user, name=name, host=host).node


@pytest.fixture
def alice_node(alice, local_host):
    return request_node(alice, "alpha")


def give_secret(node) -> str:
    """What provisioning does: a fresh node secret, its hash on the node row."""
    from fleet.models import Node
    from fleet.services.credentials import new_secret

    secret, digest = new_secret()
    Node.objects.filter(pk=node.pk).update(secret_sha256=digest)
    node.secret_sha256 = digest
    return secret


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
    from fleet.services import jobs

    runner = FakeRunner()
    monkeypatch.setattr(jobs, "_runner", runner.module)
    monkeypatch.setattr(jobs, "HEALTH_WAIT_SECONDS", 0)
    return runner
