"""Agent endpoints: heartbeats (node secret, never a customer's token) and enrollment
(one-time secret); actions delivered at least once."""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from fleet.models import Enrollment, Node, NodeAction, TelemetrySample
from fleet.services import enrollment, nodes, sweeps
from fleet.services.jobs import _claim_job
from fleet.services.transitions import try_transition
from tests.platform.conftest import account, give_secret

pytestmark = pytest.mark.django_db

TELEMETRY = {
    "ops_per_cycle": 3.1,
    "throughput_gops": 40.0,
    "power_watts": None,
    "mops_per_watt": None,
    "cache_hit_rate": {"combined": 0.97},
    "sources": {},
}


def heartbeat(node, secret, **body):
    client = APIClient()
    if secret is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    payload = {
        "node_id": str(node.pk),
        "version": "0.1.0",
        "agent_url": None,
        "telemetry": TELEMETRY,
        "results": [],
    }
    payload.update(body)
    return client.post("/api/v1/agent/heartbeat", payload, format="json")


def provisioning(node) -> str:
    """The node as its provisioning job leaves it: provisioning, with a node secret."""
    _claim_job(node.jobs.get().pk)
    try_transition(node, "provisioning", "job started")
    return give_secret(node)


def test_the_first_heartbeat_makes_a_provisioning_node_ready(alice_node):
    reply = heartbeat(alice_node, provisioning(alice_node))
    assert reply.status_code == 200, reply.json()
    assert reply.json() == {
        "state": "ready",
        "heartbeat_seconds": 15,
        "actions": [],
        "acknowledged": [],
        "scrape_token_sha256": None,  # no AGENT_SCRAPE_TOKEN in these settings
    }
    alice_node.refresh_from_db()
    assert alice_node.state == "ready" and alice_node.version == "0.1.0"
    sample = TelemetrySample.objects.get(node=alice_node)
    assert sample.ops_per_cycle == 3.1 and sample.cache_hit_rate == 0.97
    assert alice_node.transitions.last().cause == "first heartbeat of its agent"


@pytest.mark.parametrize("secret", [None, "wrong-secret", ""])
def test_a_heartbeat_without_the_node_secret_is_refused(alice_node, secret):
    provisioning(alice_node)
    reply = heartbeat(alice_node, secret)
    assert reply.status_code == 401 and reply["WWW-Authenticate"].startswith("Bearer")
    assert Node.objects.get(pk=alice_node.pk).last_heartbeat_at is None


def test_a_heartbeat_with_the_customers_access_token_is_refused(alice_node, alice_api):
    """The customer can read the access token; it must never speak for the node."""
    provisioning(alice_node)
    assert heartbeat(alice_node, alice_node.access_token).status_code == 401
    assert (
        alice_api.post(
            "/api/v1/agent/heartbeat", {"node_id": str(alice_node.pk)}, format="json"
        ).status_code
        == 401
    )
    node = Node.objects.get(pk=alice_node.pk)
    assert node.state == "provisioning" and node.last_heartbeat_at is None
    assert not TelemetrySample.objects.exists()


def test_heartbeats_authenticate_before_revealing_anything(alice_node, bob, local_host):
    """No 404-before-auth: an unknown node id, another node's id and bad input all get 401
    until the secret is right; then bad input gets 400 with its reasons."""
    secret = provisioning(alice_node)
    unknown = heartbeat(alice_node, "guess", node_id="5f0c8a0e-0000-4000-8000-000000000000")
    assert unknown.status_code == 401
    assert heartbeat(alice_node, "guess", node_id="not-a-uuid", telemetry="x").status_code == 401
    other = nodes.node_request(account=account(bob), user=bob, name="b1").node
    assert heartbeat(other, secret).status_code == 401  # alice's secret, bob's node id
    bad = heartbeat(alice_node, secret, telemetry="x", version=["x"])
    assert bad.status_code == 400 and {"telemetry", "version"} <= set(bad.json())


def test_a_degraded_node_comes_back_on_its_next_heartbeat(alice_node):
    secret = provisioning(alice_node)
    heartbeat(alice_node, secret)
    Node.objects.filter(pk=alice_node.pk).update(last_seen_at=timezone.now() - timedelta(hours=1))
    assert sweeps.mark_silent_nodes() == 1
    assert Node.objects.get(pk=alice_node.pk).state == "degraded"
    assert heartbeat(alice_node, secret).json()["state"] == "ready"
    causes = [t.cause for t in alice_node.transitions.all()]
    assert causes[-2:] == ["no heartbeat for 45 s", "heartbeat received again"]


def test_actions_are_delivered_and_their_results_stored_once(alice_node):
    secret = provisioning(alice_node)
    heartbeat(alice_node, secret)
    alice_node.refresh_from_db()
    action = nodes.node_action_request(
        node=alice_node, kind="benchmark", payload={"workloads": None, "quick": True}
    )
    first = heartbeat(alice_node, secret).json()["actions"]
    assert first == [{"id": str(action.pk), "type": "benchmark", "workloads": None, "quick": True}]
    assert heartbeat(alice_node, secret).json()["actions"] == []  # not yet due again
    result = {"action_id": str(action.pk), "ok": True, "result": {"gops": 1}, "error": None}
    reply = heartbeat(alice_node, secret, results=[result]).json()
    assert reply["actions"] == [] and reply["acknowledged"] == [str(action.pk)]
    # The same result sent again (the agent missed our reply) changes nothing.
    again = dict(result, result={"gops": 999})
    assert heartbeat(alice_node, secret, results=[again]).json()["acknowledged"] == [str(action.pk)]
    action.refresh_from_db()
    assert action.ok is True and action.result == {"gops": 1} and action.deliveries == 1


def test_a_lost_reply_gets_the_action_sent_again_once_and_applied_once(alice_node, settings):
    """The reply carrying a suspend is lost: no result comes back, so after the resend timeout
    the next heartbeat carries it again (once), and its result completes it."""
    settings.ACTION_RESEND_SECONDS = 60
    secret = provisioning(alice_node)
    heartbeat(alice_node, secret)
    action = nodes.node_action_request(node=Node.objects.get(pk=alice_node.pk), kind="suspend")
    assert [a["id"] for a in heartbeat(alice_node, secret).json()["actions"]] == [str(action.pk)]
    # ... that reply never reached the agent. Before the timeout nothing is re-sent:
    assert heartbeat(alice_node, secret).json()["actions"] == []
    NodeAction.objects.filter(pk=action.pk).update(
        delivered_at=timezone.now() - timedelta(seconds=61)
    )
    resent = heartbeat(alice_node, secret).json()["actions"]
    assert resent == [{"id": str(action.pk), "type": "suspend"}]
    assert heartbeat(alice_node, secret).json()["actions"] == []  # once, not on every beat
    result = {"action_id": str(action.pk), "ok": True, "result": {"suspended": True}}
    heartbeat(alice_node, secret, results=[result])
    action.refresh_from_db()
    assert action.deliveries == 2 and action.completed_at and action.ok
    NodeAction.objects.filter(pk=action.pk).update(delivered_at=timezone.now() - timedelta(hours=1))
    assert heartbeat(alice_node, secret).json()["actions"] == []  # done: never again


def test_a_terminated_node_gets_410(alice_node):
    secret = provisioning(alice_node)
    Node.objects.filter(pk=alice_node.pk).update(state="terminated")
    reply = heartbeat(alice_node, secret)
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
    assert node.account == account(bob) and node.kind == "enrolled" and node.state == "requested"
    assert node.name == "bobs-box-local" and body["heartbeat_seconds"] == 15
    assert body["control_plane_url"] == "http://cp.test"
    assert body["access_token_sha256"] == node.access_token_sha256
    assert body["node_secret"] not in str(Node.objects.values().get(pk=node.pk))
    assert heartbeat(node, body["node_secret"]).json()["state"] == "ready"
    shown = bob_api.get(f"/api/v1/nodes/{node.pk}").json()
    assert shown["self_reported"] is True  # its figures are that machine's word
    telemetry = bob_api.get(f"/api/v1/nodes/{node.pk}/telemetry").json()
    assert telemetry["self_reported"] is True and "own machine" in telemetry["note"]


def test_an_enrollment_link_works_once(bob):
    secret = enrollment.enrollment_create(account=account(bob), user=bob).secret
    assert enroll(secret).status_code == 201
    again = enroll(secret)
    assert again.status_code == 410 and "already used" in again.json()["detail"]
    assert APIClient().get(f"/enroll/{secret}/install.sh").status_code == 404


def test_an_expired_or_unknown_enrollment_link_is_refused(bob):
    created = enrollment.enrollment_create(account=account(bob), user=bob)
    Enrollment.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert enroll(created.secret).status_code == 410
    assert enroll("nope").status_code == 404
    assert enroll(created.secret, port=70000).status_code == 400


def test_the_install_script_and_wheel_are_served_for_a_usable_link(bob, settings, tmp_path):
    settings.PROVISIONING_DIR = tmp_path
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "install.sh").write_text(
        "CP=@CONTROL_PLANE_URL@\nSECRET=@ENROLL_SECRET@\nWHEEL=@WHEEL_URL@\nSUM=@WHEEL_SHA256@\n"
    )
    secret = enrollment.enrollment_create(account=account(bob), user=bob).secret
    script = APIClient().get(f"/enroll/{secret}/install.sh")
    assert script.status_code == 200 and script["Content-Type"] == "text/x-shellscript"
    wheel_url = f"http://cp.test/enroll/{secret}/vtpu-0.1.0-cp311-cp311-linux_x86_64.whl"
    digest = hashlib.sha256(b"PK fake wheel").hexdigest()
    assert script.content.decode() == (
        f"CP=http://cp.test\nSECRET={secret}\nWHEEL={wheel_url}\nSUM={digest}\n"
    )
    wheel = APIClient().get(wheel_url.removeprefix("http://cp.test"))
    assert wheel.status_code == 200 and b"".join(wheel.streaming_content) == b"PK fake wheel"
    assert APIClient().get(f"/enroll/{secret}/vtpu-9.whl").status_code == 404
    assert APIClient().get("/enroll/unknown/install.sh").status_code == 404


def _enrolled(user):
    return enrollment.enrollment_complete(
        secret=enrollment.enrollment_create(account=account(user), user=user).secret,
        hostname="box",
        agent_url=None,
        port=None,
    )


def test_deleting_an_enrolled_node_stops_its_agent_at_the_next_heartbeat(bob, bob_api):
    enrolled = _enrolled(bob)
    heartbeat(enrolled.node, enrolled.secret)
    assert bob_api.delete(f"/api/v1/nodes/{enrolled.node.pk}").status_code == 202
    assert Node.objects.get(pk=enrolled.node.pk).state == "deprovisioning"
    assert heartbeat(enrolled.node, enrolled.secret).status_code == 410
    assert Node.objects.get(pk=enrolled.node.pk).state == "terminated"
    assert NodeAction.objects.count() == 0


def test_an_offline_enrolled_node_deleted_ends_terminated_after_the_grace_period(
    bob, bob_api, settings
):
    settings.ENROLLED_DELETE_GRACE_SECONDS = 3600
    enrolled = _enrolled(bob)
    heartbeat(enrolled.node, enrolled.secret)
    assert bob_api.delete(f"/api/v1/nodes/{enrolled.node.pk}").status_code == 202
    # Its machine is gone: no heartbeat ever comes. Within the grace period nothing happens...
    assert sweeps.terminate_vanished_enrolled_nodes() == 0
    Node.objects.filter(pk=enrolled.node.pk).update(
        delete_requested_at=timezone.now() - timedelta(seconds=3601)
    )
    # ...after it, the node is terminated with the cause on record, once.
    assert sweeps.terminate_vanished_enrolled_nodes() == 1
    assert sweeps.terminate_vanished_enrolled_nodes() == 0
    node = Node.objects.get(pk=enrolled.node.pk)
    assert node.state == "terminated"
    assert "never called again" in node.transitions.last().cause
    assert heartbeat(node, enrolled.secret).status_code == 410  # if it ever returns


def test_nul_characters_in_telemetry_or_a_result_get_400_and_the_node_keeps_beating(alice_node):
    """PostgreSQL cannot store NUL in JSON text: refused with the reason, never a 500."""
    secret = provisioning(alice_node)
    action = nodes.node_action_request(node=alice_node, kind="benchmark")
    bad = heartbeat(alice_node, secret, telemetry={**TELEMETRY, "note": "a\x00b"})
    assert bad.status_code == 400 and "NUL" in str(bad.json()["telemetry"])
    result = {"action_id": str(action.pk), "ok": True, "result": {"x\x00": 1}}
    bad = heartbeat(alice_node, secret, results=[result])
    assert bad.status_code == 400 and "NUL" in str(bad.json())
    assert NodeAction.objects.get(pk=action.pk).completed_at is None
    assert heartbeat(alice_node, secret).status_code == 200


def test_a_customer_asks_a_node_to_load_a_model_through_its_heartbeats(
    alice_node, alice_api, bob_api
):
    secret = provisioning(alice_node)
    heartbeat(alice_node, secret)  # ready
    url = f"/api/v1/nodes/{alice_node.pk}/models"
    assert alice_api.post(url, {"model": "../etc"}, format="json").status_code == 400
    assert alice_api.post(url, {}, format="json").status_code == 400
    assert alice_api.post(url, {"model": "m", "precision": "fp4"}, format="json").status_code == 400
    bf16 = alice_api.post(url, {"model": "all-MiniLM-L6-v2", "precision": "bf16"}, format="json")
    assert bf16.status_code == 201 and bf16.json()["payload"]["precision"] == "bf16"
    NodeAction.objects.filter(pk=bf16.json()["id"]).delete()  # the node is asked for one below
    assert bob_api.post(url, {"model": "all-MiniLM-L6-v2"}, format="json").status_code == 404
    asked = alice_api.post(url, {"model": "all-MiniLM-L6-v2"}, format="json")
    assert asked.status_code == 201 and asked.json()["type"] == "load_model"
    reply = heartbeat(alice_node, secret).json()
    (action,) = reply["actions"]
    assert action == {
        "id": str(asked.json()["id"]),
        "type": "load_model",
        "model": "all-MiniLM-L6-v2",
        "precision": "fp32",
    }
    result = {"id": "all-MiniLM-L6-v2", "state": "loaded", "bytes": 90258432}
    heartbeat(
        alice_node, secret, results=[{"action_id": action["id"], "ok": True, "result": result}]
    )
    listed = alice_api.get(f"/api/v1/nodes/{alice_node.pk}/actions").json()["results"]
    done = next(a for a in listed if a["id"] == asked.json()["id"])
    assert done["ok"] is True and done["result"]["state"] == "loaded"
