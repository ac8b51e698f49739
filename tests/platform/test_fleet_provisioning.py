"""Requesting, provisioning, canceling, retrying and deprovisioning nodes (fake runner)."""

import subprocess

import pytest
from django.db import IntegrityError, connection, transaction

from fleet.models import Host, JobEvent, Node, ProvisioningJob
from fleet.services.credentials import hash_secret
from fleet.services.errors import Conflict, Forbidden, NoCapacity
from fleet.services.jobs import WORKER_DIED, _claim_job, job_cancel, job_run
from fleet.services.nodes import node_deprovision_request, node_retry
from fleet.services.transitions import try_transition
from tests.platform.conftest import request_node

pytestmark = pytest.mark.django_db

EVENTS = [
    {
        "counter": 1,
        "event": "playbook_on_start",
        "host": None,
        "task": None,
        "stdout": "",
        "created": "2025-01-01T00:00:00.000001",
        "failed": False,
        "changed": False,
    },
    {
        "counter": 2,
        "event": "runner_on_ok",
        "host": "node-x",
        "task": "install wheel",
        "stdout": "ok: [node-x]",
        "created": "2025-01-01T00:00:01",
        "failed": False,
        "changed": True,
    },
]


def test_a_request_places_the_node_and_queues_its_job_on_commit(
    alice, local_host, django_capture_on_commit_callbacks, queued
):
    with django_capture_on_commit_callbacks(execute=True):
        node = request_node(alice, "alpha")
    job = node.jobs.get()
    assert node.state == "requested" and node.host == local_host and node.agent_port == 18000
    assert node.agent_url == "http://127.0.0.1:18000"
    assert queued["provision_node"] == [job.pk]
    assert job.state == "pending" and job.queued_at is not None


def test_the_access_token_is_hashed_and_encrypted_at_rest_and_no_secret_is_kept(alice_node):
    with connection.cursor() as cursor:
        cursor.execute("SELECT access_token, access_token_sha256, secret_sha256 FROM fleet_node")
        stored, digest, secret_digest = cursor.fetchone()
    assert alice_node.access_token and alice_node.access_token not in stored
    assert digest == hash_secret(alice_node.access_token)
    assert secret_digest is None  # the node secret is made when its provisioning runs
    assert Node.objects.get(pk=alice_node.pk).access_token == alice_node.access_token


def test_ports_are_unique_and_capacity_is_respected(alice, bob, local_host):
    local_host.capacity = 2
    local_host.save()
    a = request_node(alice, "a")
    b = request_node(bob, "b")
    assert {a.agent_port, b.agent_port} == {18000, 18001}
    with pytest.raises(NoCapacity):
        request_node(alice, "c")


def test_only_staff_choose_a_host_and_names_are_unique_per_customer(alice, bob, local_host):
    with pytest.raises(Forbidden, match="staff"):
        request_node(alice, "x", host=local_host)
    request_node(alice, "x")
    request_node(bob, "x")
    with pytest.raises(Conflict, match="already has"):
        request_node(alice, "x")


def test_a_successful_provision_stores_events_once_and_waits_for_the_agent(alice_node, fake_runner):
    fake_runner.events = EVENTS
    job = alice_node.jobs.get()
    job_run(job_id=job.pk)
    job.refresh_from_db()
    alice_node.refresh_from_db()
    assert job.state == "successful" and job.stdout == "PLAY RECAP ok" and job.worker
    assert list(JobEvent.objects.filter(job=job).values_list("counter", flat=True)) == [1, 2]
    # No agent answers here: the node waits for its first heartbeat.
    assert alice_node.state == "provisioning"
    spec = fake_runner.specs[0]
    assert spec.playbook == "provision.yml" and spec.target.connection == "local"
    # A fresh node secret goes to the playbook; only its hash stays here.
    assert hash_secret(spec.extravars["node_secret"]) == alice_node.secret_sha256
    assert spec.secret_vars == frozenset({"node_secret"})
    assert spec.extravars["access_token_sha256"] == alice_node.access_token_sha256
    assert alice_node.access_token not in str(spec.extravars)
    assert spec.extravars["wheel_path"].endswith(".whl")
    assert spec.extravars["node_dir"].endswith(str(alice_node.pk))
    assert spec.extravars["vtpu_models"] == []  # NODE_MODELS unset: the core wheel alone


def test_provisioning_passes_the_models_nodes_serve(alice_node, fake_runner, settings):
    settings.NODE_MODELS = ["all-MiniLM-L6-v2"]
    job_run(job_id=alice_node.jobs.get().pk)
    assert fake_runner.specs[0].extravars["vtpu_models"] == ["all-MiniLM-L6-v2"]


def test_a_failing_playbook_fails_the_job_and_the_node_with_the_reason(alice_node, fake_runner):
    fake_runner.status, fake_runner.explanation = "failed", "Host local is unreachable: refused."
    job = alice_node.jobs.get()
    job_run(job_id=job.pk)
    job.refresh_from_db()
    alice_node.refresh_from_db()
    assert job.state == "failed" and "unreachable" in job.explanation
    assert alice_node.state == "failed"
    assert "unreachable" in alice_node.transitions.last().cause


def test_a_crash_around_the_runner_still_ends_the_job(alice_node, fake_runner):
    fake_runner.raises = RuntimeError("disk full")
    job = alice_node.jobs.get()
    job_run(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == "failed" and "disk full" in job.explanation
    assert Node.objects.get(pk=alice_node.pk).state == "failed"


def test_claiming_a_job_twice_only_one_wins(alice_node, fake_runner):
    job = alice_node.jobs.get()
    assert _claim_job(job.pk) is True
    assert _claim_job(job.pk) is False


def test_a_finished_job_delivered_again_does_nothing(alice_node, fake_runner):
    job = alice_node.jobs.get()
    job_run(job_id=job.pk)
    job_run(job_id=job.pk)
    assert len(fake_runner.specs) == 1


def test_one_active_job_per_node_is_a_database_constraint(alice_node):
    with pytest.raises(IntegrityError), transaction.atomic():
        ProvisioningJob.objects.create(node=alice_node)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_redelivered_task_of_a_dead_worker_fails_the_job_without_rerunning(
    alice_node, fake_runner
):
    job = alice_node.jobs.get()
    _claim_job(job.pk)
    try_transition(alice_node, "provisioning", "job started")
    ProvisioningJob.objects.filter(pk=job.pk).update(worker_pid=_dead_pid(), runner_pid=_dead_pid())
    job_run(job_id=job.pk)  # what the redelivered task calls
    job.refresh_from_db()
    alice_node.refresh_from_db()
    assert job.state == "failed" and job.explanation.startswith(WORKER_DIED)
    assert alice_node.state == "failed"
    assert fake_runner.specs == []  # the playbook did not run again


def test_recovery_kills_the_leftover_ansible_process_group(alice_node, fake_runner):
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        job = alice_node.jobs.get()
        _claim_job(job.pk)
        ProvisioningJob.objects.filter(pk=job.pk).update(
            worker_pid=_dead_pid(), runner_pid=leftover.pid
        )
        job_run(job_id=job.pk)
        assert leftover.wait(timeout=10) != 0
        job.refresh_from_db()
        assert job.state == "failed" and f"pid {leftover.pid}" in job.explanation
    finally:
        leftover.kill()


def test_a_live_worker_keeps_its_job_on_a_duplicate_delivery(alice_node, fake_runner):
    job = alice_node.jobs.get()
    _claim_job(job.pk)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        ProvisioningJob.objects.filter(pk=job.pk).update(worker_pid=sleeper.pid)
        job_run(job_id=job.pk)
        job.refresh_from_db()
        assert job.state == "running"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_canceling_a_pending_job_fails_the_node_and_retry_starts_again(alice_node, queued):
    job = job_cancel(job=alice_node.jobs.get())
    assert job.state == "canceled"
    alice_node.refresh_from_db()
    assert alice_node.state == "failed"
    retry = node_retry(node=alice_node)
    assert retry.state == "pending" and retry.kind == "provision"
    with pytest.raises(Conflict, match="pending or running"):
        Node.objects.filter(pk=alice_node.pk).update(state="failed")
        node_retry(node=alice_node)


def test_canceling_a_running_job_asks_the_runner_to_stop(alice_node, fake_runner):
    job = alice_node.jobs.get()
    _claim_job(job.pk)
    job_cancel(job=job)
    ProvisioningJob.objects.filter(pk=job.pk).update(state="pending")  # let it run
    job_run(job_id=job.pk)
    job.refresh_from_db()
    assert fake_runner.saw_cancel and job.state == "canceled"
    assert Node.objects.get(pk=alice_node.pk).state == "failed"


def test_canceling_a_finished_job_is_refused(alice_node, fake_runner):
    job = alice_node.jobs.get()
    job_run(job_id=job.pk)
    with pytest.raises(Conflict, match="already successful"):
        job_cancel(job=job)


def test_only_a_failed_node_can_be_retried(alice_node):
    with pytest.raises(Conflict, match="Only a failed node"):
        node_retry(node=alice_node)


def test_deleting_a_ready_node_runs_the_deprovision_playbook(alice_node, fake_runner, queued):
    job_run(job_id=alice_node.jobs.get().pk)
    try_transition(Node.objects.get(pk=alice_node.pk), "ready", "heartbeat")
    job = node_deprovision_request(node=alice_node, cause="deleted by alice")
    assert job.kind == "deprovision" and Node.objects.get(pk=alice_node.pk).state == (
        "deprovisioning"
    )
    assert node_deprovision_request(node=alice_node, cause="again") == job  # idempotent
    job_run(job_id=job.pk)
    assert fake_runner.specs[-1].playbook == "deprovision.yml"
    assert Node.objects.get(pk=alice_node.pk).state == "terminated"


def test_deleting_a_node_before_provisioning_started_needs_no_playbook(alice_node, queued):
    assert node_deprovision_request(node=alice_node, cause="deleted by alice") is None
    alice_node.refresh_from_db()
    assert alice_node.state == "terminated"
    assert alice_node.jobs.get().state == "canceled"
    assert queued["deprovision_node"] == []


def test_deleting_a_node_being_provisioned_is_refused(alice_node):
    _claim_job(alice_node.jobs.get().pk)
    try_transition(alice_node, "provisioning", "started")
    with pytest.raises(Conflict, match="being provisioned"):
        node_deprovision_request(node=alice_node, cause="x")


def test_ssh_targets_carry_the_decrypted_key(alice, staff, fake_runner):
    host = Host.objects.create(
        name="h1",
        kind="ssh",
        address="10.0.0.5",
        ssh_user="ops",
        ssh_private_key="-----BEGIN KEY-----\nabc",
        base_dir="/srv/n",
        agent_host="0.0.0.0",
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT ssh_private_key FROM fleet_host WHERE id = %s", [host.pk])
        assert "BEGIN KEY" not in cursor.fetchone()[0]
    node = request_node(staff, "s1", host=host)
    assert node.agent_url == "http://10.0.0.5:18000" and node.node_dir.startswith("/srv/n/")
    job_run(job_id=node.jobs.get().pk)
    target = fake_runner.specs[0].target
    assert target.connection == "ssh" and target.private_key.startswith("-----BEGIN KEY")


def test_deleting_a_node_made_ready_while_its_playbook_still_runs_is_refused(alice_node):
    # The agent's first heartbeat can arrive before the playbook's last checks end.
    _claim_job(alice_node.jobs.get().pk)
    try_transition(alice_node, "provisioning", "started")
    try_transition(Node.objects.get(pk=alice_node.pk), "ready", "first heartbeat")
    with pytest.raises(Conflict, match="finishing a provision job"):
        node_deprovision_request(node=alice_node, cause="deleted by alice")
    assert Node.objects.get(pk=alice_node.pk).state == "ready"
    assert not alice_node.jobs.filter(kind="deprovision").exists()


@pytest.mark.django_db(transaction=True)  # a real connection to drop, outside a test transaction
def test_a_transient_database_error_at_the_jobs_end_still_records_it_successful(
    alice_node, fake_runner, monkeypatch
):
    """The playbook succeeded; the final UPDATE hits a dropped connection once. The write is
    retried, so the job is `successful`, never "the worker died"."""
    from django.db import OperationalError
    from django.db.models.query import QuerySet

    from fleet.services import jobs as job_services

    monkeypatch.setattr(job_services, "FINISH_RETRY_DELAYS", (0, 0, 0))
    real_update = QuerySet.update
    failures = []

    def flaky_update(self, **fields):
        if "finished_at" in fields and not failures:
            failures.append(fields["state"])
            raise OperationalError("server closed the connection unexpectedly")
        return real_update(self, **fields)

    monkeypatch.setattr(QuerySet, "update", flaky_update)
    job = job_run(job_id=alice_node.jobs.get().pk)
    job.refresh_from_db()
    assert failures == ["successful"]
    assert job.state == "successful" and job.finished_at is not None
    assert Node.objects.get(pk=alice_node.pk).state == "provisioning"  # waits for a heartbeat


def test_a_node_made_ready_by_heartbeat_whose_job_then_fails_ends_failed_on_record(
    alice_node, fake_runner, monkeypatch
):
    """The agent's first heartbeat lands while the playbook's last checks run; then the job
    fails. The node must not stay `ready` beside a failed job with no record."""
    fake_runner.status, fake_runner.explanation = "failed", "task 'health' failed on node-x"
    real_run = fake_runner.module

    def module():
        mod = real_run()
        inner = mod.run_job

        def run_job(spec, **kwargs):
            try_transition(Node.objects.get(pk=alice_node.pk), "ready", "first heartbeat")
            return inner(spec, **kwargs)

        mod.run_job = run_job
        return mod

    from fleet.services import jobs as job_services

    monkeypatch.setattr(job_services, "_runner", module)
    job = job_run(job_id=alice_node.jobs.get().pk)
    node = Node.objects.get(pk=alice_node.pk)
    assert job.state == "failed" and node.state == "failed"
    last = node.transitions.last()
    assert (last.from_state, last.to_state) == ("ready", "failed")
    assert "health" in last.cause and f"provisioning job {job.pk}" in last.cause


def test_a_failed_deprovision_is_visible_and_retried(alice_node, fake_runner, queued):
    job_run(job_id=alice_node.jobs.get().pk)
    try_transition(Node.objects.get(pk=alice_node.pk), "ready", "heartbeat")
    job = node_deprovision_request(node=alice_node, cause="deleted by alice")
    fake_runner.status, fake_runner.explanation = "failed", "host unreachable"
    job_run(job_id=job.pk)
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "failed" and node.delete_requested_at is not None
    assert "deprovisioning job" in node.transitions.last().cause
    assert "host unreachable" in node.transitions.last().cause
    retry = node_retry(node=node)  # retrying a failed deletion deprovisions again
    assert retry.kind == "deprovision" and retry.state == "pending"
    fake_runner.status = "successful"
    job_run(job_id=retry.pk)
    assert Node.objects.get(pk=alice_node.pk).state == "terminated"
