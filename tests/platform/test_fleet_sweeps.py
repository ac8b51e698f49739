"""Beat sweeps: orphaned jobs failed, silent nodes degraded, reachable agents polled."""

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from fleet import services, tasks
from fleet.models import Node, ProvisioningJob, TelemetrySample

pytestmark = pytest.mark.django_db


def test_a_running_job_with_no_progress_and_no_runner_is_failed(alice_node):
    job = alice_node.jobs.get()
    services._claim_job(job.pk)
    services._try_transition(alice_node, "provisioning", "started")
    long_ago = timezone.now() - timedelta(hours=2)
    ProvisioningJob.objects.filter(pk=job.pk).update(
        started_at=long_ago, last_event_at=long_ago, runner_pid=None
    )
    assert tasks.fail_orphaned_jobs() == 1
    job.refresh_from_db()
    assert job.state == "failed" and "worker is gone" in job.explanation
    assert Node.objects.get(pk=alice_node.pk).state == "failed"
    assert services.fail_orphaned_jobs() == 0


def test_a_recent_running_job_is_left_alone(alice_node):
    services._claim_job(alice_node.jobs.get().pk)
    assert services.fail_orphaned_jobs() == 0


def test_silent_ready_nodes_become_degraded(alice_node):
    Node.objects.filter(pk=alice_node.pk).update(
        state="ready", last_seen_at=timezone.now() - timedelta(seconds=46)
    )
    assert tasks.mark_silent_nodes() == 1
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "degraded" and "no heartbeat for 45 s" in node.transitions.last().cause
    Node.objects.filter(pk=alice_node.pk).update(state="ready", last_seen_at=timezone.now())
    assert services.mark_silent_nodes() == 0


class FakeAgent(BaseHTTPRequestHandler):
    token = ""

    def do_GET(self):  # noqa: N802
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps(
            {"ops_per_cycle": 2.9, "throughput_gops": 12.5, "cache_hit_rate": None}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_polling_stores_a_sample_and_an_unreachable_agent_degrades(alice_node):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAgent)
    FakeAgent.token = alice_node.token
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        Node.objects.filter(pk=alice_node.pk).update(
            state="degraded", agent_url=f"http://127.0.0.1:{server.server_port}"
        )
        assert tasks.poll_nodes() == 1
        sample = TelemetrySample.objects.get(node=alice_node)
        assert sample.ops_per_cycle == 2.9 and sample.cache_hit_rate is None
        assert Node.objects.get(pk=alice_node.pk).state == "ready"
    finally:
        server.shutdown()
        server.server_close()
    assert services.poll_nodes() == 0
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "degraded" and "telemetry poll failed" in node.transitions.last().cause
