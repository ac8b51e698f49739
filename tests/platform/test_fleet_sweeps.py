"""Beat sweeps: orphaned jobs failed, silent nodes degraded (race-free), reachable agents
health-checked as the right node, unsent jobs sent again, dead agents repaired, history pruned."""

import json
import subprocess
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from fleet import tasks
from fleet.models import JobEvent, Node, NodeTransition, ProvisioningJob, TelemetrySample
from fleet.services import jobs, sweeps, transitions
from fleet.services.jobs import _claim_job
from fleet.services.transitions import try_transition

pytestmark = pytest.mark.django_db


def test_a_running_job_with_no_progress_and_no_runner_is_failed(alice_node):
    job = alice_node.jobs.get()
    _claim_job(job.pk)
    try_transition(alice_node, "provisioning", "started")
    long_ago = timezone.now() - timedelta(hours=2)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        started_at=long_ago, last_event_at=long_ago, runner_pid=None, worker="elsewhere"
    )
    assert tasks.fail_orphaned_jobs() == 1
    job.refresh_from_db()
    assert job.state == "failed" and "worker is gone" in job.explanation
    assert Node.objects.get(pk=alice_node.pk).state == "failed"
    assert sweeps.fail_orphaned_jobs() == 0


def test_a_job_whose_worker_process_died_here_is_failed_at_once(alice_node):
    job = alice_node.jobs.get()
    _claim_job(job.pk)
    try_transition(alice_node, "provisioning", "started")
    dead = subprocess.Popen(["true"])
    dead.wait()
    ProvisioningJob.objects.filter(pk=job.pk).update(worker_pid=dead.pid)
    assert sweeps.fail_orphaned_jobs() == 1
    job.refresh_from_db()
    assert job.state == "failed" and "worker running this job died" in job.explanation


def test_a_recent_running_job_is_left_alone(alice_node):
    _claim_job(alice_node.jobs.get().pk)  # claimed by this (live) process
    assert sweeps.fail_orphaned_jobs() == 0


def test_silent_ready_nodes_become_degraded(alice_node):
    Node.objects.filter(pk=alice_node.pk).update(
        state="ready", last_seen_at=timezone.now() - timedelta(seconds=46)
    )
    assert tasks.mark_silent_nodes() == 1
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "degraded" and "no heartbeat for 45 s" in node.transitions.last().cause
    assert sweeps.mark_silent_nodes() == 0  # nothing changed: no second row
    assert node.transitions.filter(to_state="degraded").count() == 1


def test_a_heartbeat_landing_between_the_sweeps_read_and_write_wins(alice_node, monkeypatch):
    """The sweep reads the node as silent; a heartbeat lands before its UPDATE; the node must
    stay ready with no transition recorded."""
    Node.objects.filter(pk=alice_node.pk).update(
        state="ready", last_seen_at=timezone.now() - timedelta(seconds=46)
    )
    real = transitions.claim_transition

    def heartbeat_lands_first(node, from_state, to_state, cause, *, only_if=None):
        Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now())  # the heartbeat
        return real(node, from_state, to_state, cause, only_if=only_if)

    monkeypatch.setattr(transitions, "claim_transition", heartbeat_lands_first)
    assert sweeps.mark_silent_nodes() == 0
    assert Node.objects.get(pk=alice_node.pk).state == "ready"
    assert not NodeTransition.objects.filter(node=alice_node, to_state="degraded").exists()


class FakeAgent(BaseHTTPRequestHandler):
    token = ""
    node_id = ""

    def do_GET(self):  # noqa: N802
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        if self.path == "/vTPU/health":
            doc = {"status": "ok", "node_id": self.node_id}
        else:
            doc = {"ops_per_cycle": 2.9, "throughput_gops": 12.5, "cache_hit_rate": None}
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_agent():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAgent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_polling_stores_a_sample_and_an_unreachable_agent_degrades(alice_node, fake_agent):
    FakeAgent.token, FakeAgent.node_id = alice_node.access_token, str(alice_node.pk)
    Node.objects.filter(pk=alice_node.pk).update(
        state="degraded", agent_url=f"http://127.0.0.1:{fake_agent.server_port}"
    )
    assert tasks.poll_nodes() == 1
    sample = TelemetrySample.objects.get(node=alice_node)
    assert sample.ops_per_cycle == 2.9 and sample.cache_hit_rate is None
    assert Node.objects.get(pk=alice_node.pk).state == "ready"
    fake_agent.shutdown()
    fake_agent.server_close()
    assert sweeps.poll_nodes() == 0
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "degraded" and "health check failed" in node.transitions.last().cause
    assert sweeps.poll_nodes() == 0
    assert node.transitions.filter(to_state="degraded").count() == 1  # no flapping rows


def test_another_agent_on_the_nodes_port_never_makes_it_look_up(alice_node, fake_agent):
    """Same port, valid token, but another node's id in the authenticated answer."""
    FakeAgent.token, FakeAgent.node_id = alice_node.access_token, "someone-else"
    Node.objects.filter(pk=alice_node.pk).update(
        state="ready", agent_url=f"http://127.0.0.1:{fake_agent.server_port}"
    )
    assert sweeps.poll_nodes() == 0
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "degraded" and "someone-else" in node.transitions.last().cause
    assert not TelemetrySample.objects.exists()


def test_a_job_requested_while_the_broker_was_down_is_sent_again(
    alice, local_host, monkeypatch, django_capture_on_commit_callbacks
):
    """The request commits, the send fails (logged, no 500); the sweep sends it later."""
    from fleet.services import queue
    from tests.platform.conftest import api_client_for

    sent = []
    broker_up = {"value": False}

    def send_task(name, *args, **options):
        if not broker_up["value"]:
            return False  # what queue.send_task answers when Redis refuses
        sent.append(args)
        return True

    monkeypatch.setattr(queue, "send_task", send_task)
    with django_capture_on_commit_callbacks(execute=True):
        reply = api_client_for(alice).post("/api/v1/nodes", {"name": "down"}, format="json")
    assert reply.status_code == 201, reply.json()
    job = ProvisioningJob.objects.get(node_id=reply.json()["id"])
    assert job.state == "pending" and job.queued_at is None
    ProvisioningJob.objects.filter(pk=job.pk).update(created=timezone.now() - timedelta(minutes=1))
    assert sweeps.requeue_pending_jobs() == 0  # still down: tried, given back
    broker_up["value"] = True
    assert sweeps.requeue_pending_jobs() == 1
    assert sent == [(job.pk,)]
    assert sweeps.requeue_pending_jobs() == 0  # sent recently: not again


def test_send_task_survives_a_broker_that_refuses(queued):
    """The real send path against a port where nothing listens: False, never an exception."""
    from controlplane.celery import app

    send_task = queued["real_send_task"]
    old = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    try:
        app.pool.force_close_all()
        assert send_task("fleet.tasks.run_job", 1) is False
    finally:
        app.conf.broker_url = old
        app.pool.force_close_all()


def test_a_node_degraded_too_long_gets_one_repair_job(
    alice_node, settings, queued, django_capture_on_commit_callbacks
):
    settings.REPAIR_AFTER_SECONDS = 600
    alice_node.jobs.update(state="successful")
    Node.objects.filter(pk=alice_node.pk).update(state="ready")
    node = Node.objects.get(pk=alice_node.pk)
    try_transition(node, "degraded", "no heartbeat for 45 s")
    assert sweeps.repair_dead_agents() == 0  # not long enough yet
    NodeTransition.objects.filter(node=node, to_state="degraded").update(
        created=timezone.now() - timedelta(seconds=601)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert sweeps.repair_dead_agents() == 1
    repair = node.jobs.get(kind="repair")
    assert queued["repair_node"] == [repair.pk]
    assert sweeps.repair_dead_agents() == 0  # one at a time


def test_a_repair_restarts_the_agent_and_the_node_is_ready_again(
    alice_node, fake_runner, monkeypatch
):
    alice_node.jobs.update(state="successful")
    Node.objects.filter(pk=alice_node.pk).update(state="degraded")
    repair = ProvisioningJob.objects.create(node=alice_node, kind="repair")
    monkeypatch.setattr(jobs.agents, "agent_healthy", lambda node, wait: True)
    jobs.job_run(job_id=repair.pk)
    repair.refresh_from_db()
    node = Node.objects.get(pk=alice_node.pk)
    assert repair.state == "successful" and fake_runner.specs[0].playbook == "provision.yml"
    assert node.state == "ready" and "repair job" in node.transitions.last().cause


def test_history_is_pruned_after_its_retention(alice_node, settings):
    settings.TELEMETRY_RETENTION_DAYS, settings.JOB_EVENT_RETENTION_DAYS = 7, 90
    old, new = (
        TelemetrySample.objects.create(node=alice_node),
        TelemetrySample.objects.create(node=alice_node),
    )
    TelemetrySample.objects.filter(pk=old.pk).update(created=timezone.now() - timedelta(days=8))
    job = alice_node.jobs.get()
    JobEvent.objects.create(job=job, counter=1, event="x", created=timezone.now() - timedelta(91))
    JobEvent.objects.create(job=job, counter=2, event="y", created=timezone.now())
    assert sweeps.prune_history() == {"telemetry_samples": 1, "job_events": 1}
    assert list(TelemetrySample.objects.values_list("pk", flat=True)) == [new.pk]
    assert NodeTransition.objects.filter(node=alice_node).exists()  # transitions are kept
