"""/api/v1/nodes and /api/v1/jobs: a customer sees and touches only their own."""

import pytest

from fleet import services
from fleet.models import JobEvent, Node, TelemetrySample

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
        ({"name": "ok", "host": 999}, "host"),
    ],
)
def test_bad_input_gets_400_with_the_reason_per_field(alice_api, local_host, body, field):
    reply = alice_api.post("/api/v1/nodes", body, format="json")
    assert reply.status_code == 400
    assert reply.json()[field] and isinstance(reply.json()[field][0], str)


def test_a_duplicate_name_or_a_customer_choosing_a_host_is_refused(alice_api, local_host):
    alice_api.post("/api/v1/nodes", {"name": "alpha"}, format="json")
    duplicate = alice_api.post("/api/v1/nodes", {"name": "alpha"}, format="json")
    assert duplicate.status_code == 409 and "already have" in duplicate.json()["name"][0]
    chosen = alice_api.post("/api/v1/nodes", {"name": "b", "host": local_host.pk}, format="json")
    assert chosen.status_code == 400 and "staff" in chosen.json()["host"][0]


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
    services.store_job_events(
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
    assert creds == {"agent_url": alice_node.agent_url, "token": alice_node.token}


def test_an_unknown_or_malformed_node_id_is_404(alice_api):
    assert alice_api.get("/api/v1/nodes/5f0c8a0e-0000-4000-8000-000000000000").status_code == 404
    assert alice_api.get("/api/v1/nodes/12").status_code == 404
