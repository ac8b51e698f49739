"""Agent endpoints: heartbeats (node token) and enrollment (one-time secret)."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from fleet import services
from fleet.models import Enrollment, Node, NodeAction, TelemetrySample

pytestmark = pytest.mark.django_db

TELEMETRY = {
    "ops_per_cycle": 3.1,
    "throughput_gops": 40.0,
    "power_watts": None,
    "mops_per_watt": None,
    "cache_hit_rate": {"combined": 0.97},
    "sources": {},
}


def heartbeat(node, token=None, **body):
    client = APIClient()
    if token is not False:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token or node.token}")
    payload = {
        "node_id": str(node.pk),
        "version": "0.1.0",
        "agent_url": None,
        "telemetry": TELEMETRY,
        "results": [],
    }
    payload.update(body)
    return client.post("/api/v1/agent/heartbeat", payload, format="json")


def provisioning(node):
    services._claim_job(node.jobs.get().pk)
    services._try_transition(node, "provisioning", "job started")
    return node


def test_the_first_heartbeat_makes_a_provisioning_node_ready(alice_node):
    reply = heartbeat(provisioning(alice_node))
    assert reply.status_code == 200, reply.json()
    assert reply.json() == {"state": "ready", "heartbeat_seconds": 15, "actions": []}
    alice_node.refresh_from_db()
    assert alice_node.state == "ready" and alice_node.version == "0.1.0"
    sample = TelemetrySample.objects.get(node=alice_node)
    assert sample.ops_per_cycle == 3.1 and sample.cache_hit_rate == 0.97
    assert alice_node.transitions.last().cause == "first heartbeat of its agent"


@pytest.mark.parametrize("token,status", [(False, 401), ("wrong-token", 401)])
def test_a_heartbeat_without_the_node_token_is_refused(alice_node, token, status):
    assert heartbeat(alice_node, token=token).status_code == status


def test_a_customer_api_token_is_not_a_node_token(alice_node, alice_api):
    reply = alice_api.post(
        "/api/v1/agent/heartbeat", {"node_id": str(alice_node.pk)}, format="json"
    )
    assert reply.status_code == 401


def test_an_unknown_node_gets_404_and_bad_input_400(alice_node):
    assert heartbeat(alice_node, node_id="5f0c8a0e-0000-4000-8000-000000000000").status_code == 404
    bad = heartbeat(alice_node, node_id="not-a-uuid", telemetry="x")
    assert bad.status_code == 400 and {"node_id", "telemetry"} <= set(bad.json())


def test_a_degraded_node_comes_back_on_its_next_heartbeat(alice_node):
    heartbeat(provisioning(alice_node))
    Node.objects.filter(pk=alice_node.pk).update(last_seen_at=timezone.now() - timedelta(hours=1))
    assert services.mark_silent_nodes() == 1
    assert Node.objects.get(pk=alice_node.pk).state == "degraded"
    assert heartbeat(alice_node).json()["state"] == "ready"


def test_actions_are_delivered_once_and_their_results_stored(alice_node):
    heartbeat(provisioning(alice_node))
    alice_node.refresh_from_db()
    action = services.node_action_request(
        node=alice_node, kind="benchmark", payload={"workloads": None, "quick": True}
    )
    first = heartbeat(alice_node).json()["actions"]
    assert first == [{"id": str(action.pk), "type": "benchmark", "workloads": None, "quick": True}]
    assert (
        heartbeat(
            alice_node,
            results=[
                {"action_id": str(action.pk), "ok": True, "result": {"gops": 1}, "error": None}
            ],
        ).json()["actions"]
        == []
    )
    action.refresh_from_db()
    assert action.ok is True and action.result == {"gops": 1}


def test_a_terminated_node_gets_410(alice_node):
    Node.objects.filter(pk=alice_node.pk).update(state="terminated")
    reply = heartbeat(alice_node)
    assert reply.status_code == 410 and "terminated" in reply.json()["detail"]


def enroll(secret, **extra):
    body = {"secret": secret, "hostname": "Bobs-Box.local", "agent_url": None, "port": 8470}
    body.update(extra)
    return APIClient().post("/api/v1/enroll", body, format="json")


def test_enrollment_creates_an_enrolled_node_that_a_heartbeat_makes_ready(bob_api, bob):
    created = bob_api.post("/api/v1/enrollments").json()
    assert created["url"].startswith("http://cp.test/enroll/") and created["url"].endswith(
        "/install.sh"
    )
    assert created["command"] == f"curl -fsSL {created['url']} | sh"
    secret = created["url"].split("/")[-2]
    assert secret not in str(Enrollment.objects.values().get())
    reply = enroll(secret)
    assert reply.status_code == 201, reply.json()
    body = reply.json()
    node = Node.objects.get(pk=body["node_id"])
    assert node.customer == bob and node.kind == "enrolled" and node.state == "requested"
    assert node.name == "bobs-box-local" and body["heartbeat_seconds"] == 15
    assert body["control_plane_url"] == "http://cp.test"
    assert heartbeat(node, token=body["node_token"]).json()["state"] == "ready"


def test_an_enrollment_link_works_once(bob):
    secret = services.enrollment_create(customer=bob).secret
    assert enroll(secret).status_code == 201
    again = enroll(secret)
    assert again.status_code == 410 and "already used" in again.json()["detail"]
    assert APIClient().get(f"/enroll/{secret}/install.sh").status_code == 404


def test_an_expired_or_unknown_enrollment_link_is_refused(bob):
    created = services.enrollment_create(customer=bob)
    Enrollment.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert enroll(created.secret).status_code == 410
    assert enroll("nope").status_code == 404
    assert enroll(created.secret, port=70000).status_code == 400


def test_the_install_script_and_wheel_are_served_for_a_usable_link(bob, settings, tmp_path):
    settings.PROVISIONING_DIR = tmp_path
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "install.sh").write_text(
        "CP=@CONTROL_PLANE_URL@\nSECRET=@ENROLL_SECRET@\nWHEEL=@WHEEL_URL@\n"
    )
    secret = services.enrollment_create(customer=bob).secret
    script = APIClient().get(f"/enroll/{secret}/install.sh")
    assert script.status_code == 200 and script["Content-Type"] == "text/x-shellscript"
    wheel_url = f"http://cp.test/enroll/{secret}/vtpu-0.1.0-cp311-cp311-linux_x86_64.whl"
    assert script.content.decode() == f"CP=http://cp.test\nSECRET={secret}\nWHEEL={wheel_url}\n"
    wheel = APIClient().get(wheel_url.removeprefix("http://cp.test"))
    assert wheel.status_code == 200 and b"".join(wheel.streaming_content) == b"PK fake wheel"
    assert APIClient().get(f"/enroll/{secret}/vtpu-9.whl").status_code == 404
    assert APIClient().get("/enroll/unknown/install.sh").status_code == 404


def test_deleting_an_enrolled_node_stops_its_agent_at_the_next_heartbeat(bob, bob_api):
    enrolled = services.enrollment_complete(
        secret=services.enrollment_create(customer=bob).secret,
        hostname="box",
        agent_url=None,
        port=None,
    )
    heartbeat(enrolled.node, token=enrolled.token)
    assert bob_api.delete(f"/api/v1/nodes/{enrolled.node.pk}").status_code == 202
    assert Node.objects.get(pk=enrolled.node.pk).state == "deprovisioning"
    assert heartbeat(enrolled.node, token=enrolled.token).status_code == 410
    assert Node.objects.get(pk=enrolled.node.pk).state == "terminated"
    assert NodeAction.objects.count() == 0
