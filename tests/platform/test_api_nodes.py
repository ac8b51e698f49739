"""/api/v1/nodes and /api/v1/jobs: a customer sees and touches only their own."""

import pytest

from fleet.models import JobEvent, Node, TelemetrySample
from fleet.services import jobs

pytestmark = pytest.mark.django_db


def test_alice_creates_lists_and_gets_her_node(alice_api, local_host, queued):
    reply = alice_api.post("/api/v1/nodes", {"name": "alpha"}, format="json")
    assert reply.status_code == 201, reply.json()
    node = reply.json()
    assert node["state"] == "requested" and node["kind"] == "provisioned"
    assert "token" not in node
    assert [n["id"] for n in alice_api.get("/api/v1/nodes").json()["results"]] == [node["id"]]
    assert alice_api.get(f"/api/v1/nodes/{node['id']}").json()["name"] == "alpha"
    jobs = alice_api.get(f"/api/v1/nodes/{node['id']}/jobs").json()["results"]
    assert [j["kind"] for j in jobs] == ["provision"] and jobs[0]["state"] == "pending"


@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "name"),
        ({"name": "Not Valid!"}, "name"),
        ({"name": "x" * 64}, "name"),
    ],
)
def test_bad_input_gets_400_with_the_reason_per_field(alice_api, local_host, body, field):
    reply = alice_api.post("/api/v1/nodes", body, format="json")
    assert reply.status_code == 400
    assert reply.json()[field] and isinstance(reply.json()[field][0], str)


def test_a_duplicate_name_or_a_customer_choosing_a_host_is_refused(alice_api, local_host):
    alice_api.post("/api/v1/nodes", {"name": "alpha"}, format="json")
    duplicate = alice_api.post("/api/v1/nodes", {"name": "alpha"}, format="json")
    assert duplicate.status_code == 409 and "already has" in duplicate.json()["name"][0]
    chosen = alice_api.post("/api/v1/nodes", {"name": "b", "host": local_host.pk}, format="json")
    assert chosen.status_code == 403 and "staff" in chosen.json()["host"][0]
    unknown = alice_api.post("/api/v1/nodes", {"name": "c", "host": 999}, format="json")
    assert unknown.status_code == 403  # host ids are staff's business: no 404 that tells


def test_staff_choosing_an_unknown_host_gets_404(staff, local_host):
    from tests.platform.conftest import api_client_for

    reply = api_client_for(staff).post("/api/v1/nodes", {"name": "c", "host": 999}, format="json")
    assert reply.status_code == 404 and "host" in reply.json()["detail"]


def test_no_capacity_is_a_503_with_a_reason(alice_api):
    reply = alice_api.post("/api/v1/nodes", {"name": "alpha"}, format="json")
    assert reply.status_code == 503 and "No host has room" in reply.json()["detail"]


def test_malformed_json_is_a_400(alice_api):
    reply = alice_api.post("/api/v1/nodes", "{not json", content_type="application/json")
    assert reply.status_code == 400 and "JSON" in reply.json()["detail"]


def test_bob_gets_404_for_alices_node_and_jobs(alice_node, bob_api):
    job = alice_node.jobs.get()
    for path in [
        f"/api/v1/nodes/{alice_node.pk}",
        f"/api/v1/nodes/{alice_node.pk}/jobs",
        f"/api/v1/nodes/{alice_node.pk}/telemetry",
        f"/api/v1/nodes/{alice_node.pk}/credentials",
        f"/api/v1/jobs/{job.pk}",
        f"/api/v1/jobs/{job.pk}/events",
    ]:
        assert bob_api.get(path).status_code == 404, path
    assert bob_api.delete(f"/api/v1/nodes/{alice_node.pk}").status_code == 404
    assert bob_api.post(f"/api/v1/nodes/{alice_node.pk}/retry").status_code == 404
    assert bob_api.post(f"/api/v1/jobs/{job.pk}/cancel").status_code == 404
    assert bob_api.get("/api/v1/nodes").json()["results"] == []
    assert Node.objects.get(pk=alice_node.pk).state == "requested"


def test_job_detail_and_live_events_after_a_counter(alice_node, alice_api):
    job = alice_node.jobs.get()
    jobs.store_job_events(
        job_id=job.pk,
        events=[{"counter": n, "event": "runner_on_ok", "stdout": f"line {n}"} for n in (1, 2, 3)],
    )
    assert alice_api.get(f"/api/v1/jobs/{job.pk}").json()["stdout"] == ""
    events = alice_api.get(f"/api/v1/jobs/{job.pk}/events?after=1").json()
    assert [e["counter"] for e in events["events"]] == [2, 3] and events["last_counter"] == 3
    assert alice_api.get(f"/api/v1/jobs/{job.pk}/events?after=x").status_code == 400
    assert JobEvent.objects.count() == 3


def test_cancel_retry_and_delete_through_the_api(alice_node, alice_api, queued):
    job = alice_node.jobs.get()
    canceled = alice_api.post(f"/api/v1/jobs/{job.pk}/cancel")
    assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
    again = alice_api.post(f"/api/v1/jobs/{job.pk}/cancel")
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]
    retried = alice_api.post(f"/api/v1/nodes/{alice_node.pk}/retry")
    assert retried.status_code == 202 and retried.json()["state"] == "pending"
    deleted = alice_api.delete(f"/api/v1/nodes/{alice_node.pk}")
    assert deleted.status_code == 202 and deleted.json()["state"] == "terminated"
    assert alice_api.delete(f"/api/v1/nodes/{alice_node.pk}").status_code == 409


def test_telemetry_and_credentials_of_her_node(alice_node, alice_api):
    TelemetrySample.objects.create(node=alice_node, ops_per_cycle=3.0, data={"x": 1})
    body = alice_api.get(f"/api/v1/nodes/{alice_node.pk}/telemetry").json()
    assert body["samples"][0]["ops_per_cycle"] == 3.0
    creds = alice_api.get(f"/api/v1/nodes/{alice_node.pk}/credentials").json()
    assert creds == {
        "agent_url": alice_node.agent_url,
        "token": alice_node.access_token,
        "rotation_pending": False,
    }


def test_over_quota_is_a_403_with_the_reason_and_staff_can_raise_it(alice, alice_api, local_host):
    from accounts.services import account_set_quota

    account_set_quota(account=alice.membership.account, node_quota=1)
    assert alice_api.post("/api/v1/nodes", {"name": "one"}, format="json").status_code == 201
    over = alice_api.post("/api/v1/nodes", {"name": "two"}, format="json")
    assert over.status_code == 403 and "may have 1 live node and has 1" in over.json()["detail"]
    assert Node.objects.count() == 1
    enrolling = alice_api.post("/api/v1/enrollments")
    assert enrolling.status_code == 403  # an enrolled machine counts too
    account_set_quota(account=alice.membership.account, node_quota=2)
    assert alice_api.post("/api/v1/nodes", {"name": "two"}, format="json").status_code == 201


def test_members_of_one_account_share_its_nodes(alice, alice_node, db):
    from django.contrib.auth import get_user_model

    from accounts.services import member_add
    from tests.platform.conftest import api_client_for

    carol = get_user_model().objects.create_user("carol")
    member_add(account=alice.membership.account, user=carol)
    listed = api_client_for(carol).get("/api/v1/nodes").json()["results"]
    assert [n["id"] for n in listed] == [str(alice_node.pk)]


def test_rotating_the_access_token_reaches_the_agent_as_a_hash(alice_node, alice_api):
    from fleet.models import NodeAction
    from fleet.services.credentials import hash_secret

    old = alice_node.access_token
    rotated = alice_api.post(f"/api/v1/nodes/{alice_node.pk}/credentials/rotate")
    assert rotated.status_code == 200, rotated.json()
    body = rotated.json()
    assert body["token"] != old and body["rotation_pending"] is True
    action = NodeAction.objects.get(node=alice_node, kind="rotate_token")
    assert action.payload == {"token_sha256": hash_secret(body["token"])}
    assert body["token"] not in str(action.payload)
    # A second rotation supersedes the first: only the newest hash is delivered.
    second = alice_api.post(f"/api/v1/nodes/{alice_node.pk}/credentials/rotate").json()
    pending = NodeAction.objects.filter(node=alice_node, completed_at__isnull=True)
    assert [a.payload["token_sha256"] for a in pending] == [hash_secret(second["token"])]


def test_an_unknown_or_malformed_node_id_is_404(alice_api):
    assert alice_api.get("/api/v1/nodes/5f0c8a0e-0000-4000-8000-000000000000").status_code == 404
    assert alice_api.get("/api/v1/nodes/12").status_code == 404
