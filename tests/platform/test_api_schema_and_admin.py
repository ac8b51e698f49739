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
    "auth/user/",
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
    assert alice_node.token not in node_page


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
