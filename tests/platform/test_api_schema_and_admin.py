"""The OpenAPI schema is served; admin pages load for staff and redirect others."""

import json

import pytest
from django.test import Client

from fleet.models import JobEvent

pytestmark = pytest.mark.django_db


def test_the_openapi_schema_is_served_as_json_with_the_node_paths(client):
    reply = client.get("/api/v1/schema/?format=json")
    assert reply.status_code == 200
    schema = json.loads(reply.content)
    assert schema["openapi"].startswith("3.")
    assert {
        "/api/v1/nodes",
        "/api/v1/nodes/{node_id}",
        "/api/v1/tokens",
        "/api/v1/jobs/{job_id}/events",
        "/api/v1/agent/heartbeat",
    } <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["apiToken"]["scheme"] == "bearer"


def test_the_schema_is_served_as_yaml_too(client):
    reply = client.get("/api/v1/schema/")
    assert reply.status_code == 200 and b"openapi:" in reply.content


ADMIN_PAGES = [
    "",
    "accounts/apitoken/",
    "fleet/host/",
    "fleet/host/add/",
    "fleet/node/",
    "fleet/provisioningjob/",
    "fleet/nodetransition/",
    "fleet/telemetrysample/",
    "fleet/enrollment/",
    "fleet/nodeaction/",
    "accounts/user/",
    "accounts/account/",
    "django_celery_beat/periodictask/",
]


def test_admin_pages_load_for_staff(staff, alice_node):
    job = alice_node.jobs.get()
    JobEvent.objects.create(job=job, counter=1, event="runner_on_ok", created=job.created)
    client = Client()
    client.force_login(staff)
    pages = [
        *ADMIN_PAGES,
        f"fleet/node/{alice_node.pk}/change/",
        f"fleet/provisioningjob/{job.pk}/change/",
        "fleet/node/?state__exact=requested",
    ]
    for page in pages:
        reply = client.get(f"/admin/{page}")
        assert reply.status_code == 200, page
    node_page = client.get(f"/admin/fleet/node/{alice_node.pk}/change/").content.decode()
    assert alice_node.access_token not in node_page


def test_staff_force_a_node_to_terminated_with_a_reason_from_the_admin(staff, alice_node):
    client = Client()
    client.force_login(staff)
    form = {"action": "force_terminate", "_selected_action": [str(alice_node.pk)]}
    asked = client.post("/admin/fleet/node/", form)
    assert asked.status_code == 200 and b"reason" in asked.content  # asks for the reason first
    assert (
        client.post("/admin/fleet/node/", {**form, "apply": "1", "reason": ""}).status_code == 200
    )
    alice_node.refresh_from_db()
    assert alice_node.state == "requested"  # no reason, nothing done
    done = client.post("/admin/fleet/node/", {**form, "apply": "1", "reason": "machine wiped"})
    assert done.status_code == 302
    alice_node.refresh_from_db()
    assert alice_node.state == "terminated"
    assert alice_node.transitions.last().cause == "forced to terminated by sam: machine wiped"
    assert alice_node.jobs.get().state == "canceled"


def test_the_admin_refuses_an_ssh_host_with_a_loopback_agent_address(staff):
    client = Client()
    client.force_login(staff)
    reply = client.post(
        "/admin/fleet/host/add/",
        {"name": "far", "kind": "ssh", "address": "203.0.113.9", "ssh_port": 22,
         "python": "python3", "base_dir": "/srv/vtpu", "agent_host": "127.0.0.1",
         "port_range_start": 18000, "port_range_end": 18010, "tdp_watts": 65,
         "capacity": 4, "is_active": "on"},
    )  # fmt: skip
    assert reply.status_code == 200 and b"loopback address" in reply.content
    from fleet.models import Host

    assert not Host.objects.filter(name="far").exists()


def test_the_host_form_never_shows_the_ssh_key_and_keeps_it(staff, local_host):
    local_host.ssh_private_key = "-----BEGIN SECRET KEY-----"
    local_host.save()
    client = Client()
    client.force_login(staff)
    page = client.get(f"/admin/fleet/host/{local_host.pk}/change/").content.decode()
    assert "BEGIN SECRET KEY" not in page


def test_admin_redirects_customers_to_login(alice):
    client = Client()
    client.force_login(alice)
    for page in ADMIN_PAGES:
        reply = client.get(f"/admin/{page}")
        assert reply.status_code == 302 and "/admin/login/" in reply["Location"], page
