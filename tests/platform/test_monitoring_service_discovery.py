"""Prometheus' http_sd of the node agents (GET /api/v1/prometheus/targets): behind the scrape
token, ready and degraded nodes only, enrolled nodes only once staff approved their address;
and the fleet scrape token's hash handed to agents in heartbeat replies."""

import hashlib

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client
from rest_framework.test import APIClient

from fleet.models import Node
from fleet.services import enrollment
from tests.platform.conftest import account, api_client_for, request_node

pytestmark = pytest.mark.django_db

TARGETS = "/api/v1/prometheus/targets"


@pytest.fixture(autouse=True)
def _tokens(settings):
    settings.METRICS_TOKEN = "scrape-me"
    settings.AGENT_SCRAPE_TOKEN = "agents-scrape-token-0123456789"


def targets(token="scrape-me"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return Client().get(TARGETS, **headers)


def ready(node, url):
    Node.objects.filter(pk=node.pk).update(state="ready", agent_url=url)
    node.refresh_from_db()
    return node


def enrolled_node(user, url="http://192.0.2.7:8470"):
    created = enrollment.enrollment_create(account=account(user), user=user)
    done = enrollment.enrollment_complete(
        secret=created.secret, hostname="box", agent_url=url, port=8470
    )
    return ready(done.node, url), done.secret


def test_targets_need_the_scrape_token_not_a_customers(settings, alice):
    assert targets(token=None).status_code == 401
    assert targets(token="wrong").status_code == 401
    assert targets(token="scrapé").status_code == 401  # non-ASCII: refused, not a 500
    customer = api_client_for(alice)  # a valid API token of alice's account
    assert customer.get(TARGETS).status_code == 401
    settings.METRICS_TOKEN = ""
    assert targets().status_code == 404  # off until configured
    settings.METRICS_TOKEN = "scrape-me"
    reply = targets()
    assert reply.status_code == 200 and reply.json() == []


def test_ready_and_degraded_nodes_are_listed_with_their_labels(alice, bob, local_host):
    up = ready(request_node(alice, "alpha"), "http://127.0.0.1:18001")
    degraded = ready(request_node(bob, "beta"), "https://node.example.com/agent/")
    Node.objects.filter(pk=degraded.pk).update(state="degraded")
    Node.objects.filter(pk=ready(request_node(alice, "gamma"), "http://127.0.0.1:18003").pk).update(
        state="suspended"
    )
    request_node(alice, "delta")  # requested: no agent yet
    assert targets().json() == [
        {
            "targets": ["127.0.0.1:18001"],
            "labels": {
                "__scheme__": "http",
                "__metrics_path__": "/metrics",
                "node": str(up.pk),
                "account": str(up.account_id),
                "node_name": "alpha",
            },
        },
        {
            "targets": ["node.example.com:443"],
            "labels": {
                "__scheme__": "https",
                "__metrics_path__": "/agent/metrics",
                "node": str(degraded.pk),
                "account": str(degraded.account_id),
                "node_name": "beta",
            },
        },
    ]


def test_an_unapproved_enrolled_node_is_not_listed(alice):
    # The customer's agent chose this address: listing it would make our Prometheus fetch
    # whatever the customer points it at (server-side request forgery).
    enrolled_node(alice, url="http://10.0.0.5:8470")
    assert targets().json() == []


def test_staff_approve_an_enrolled_node_in_the_admin_until_its_address_changes(alice, staff):
    node, secret = enrolled_node(alice)
    client = Client()
    client.force_login(staff)
    form = {"action": "approve_scraping", "_selected_action": [str(node.pk)]}
    assert client.post("/admin/fleet/node/", form).status_code == 302
    node.refresh_from_db()
    assert node.scrape_approved
    history = LogEntry.objects.get(object_id=str(node.pk))
    assert history.user == staff and "192.0.2.7:8470" in history.get_change_message()
    assert [g["targets"] for g in targets().json()] == [["192.0.2.7:8470"]]

    # Its agent reports another address: that one was never approved.
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    body = {"node_id": str(node.pk), "agent_url": "http://169.254.169.254:80", "results": []}
    assert agent.post("/api/v1/agent/heartbeat", body, format="json").status_code == 200
    node.refresh_from_db()
    assert not node.scrape_approved
    assert targets().json() == []


def test_approving_a_provisioned_node_changes_nothing(alice, staff, local_host):
    node = ready(request_node(alice, "alpha"), "http://127.0.0.1:18001")
    client = Client()
    client.force_login(staff)
    form = {"action": "approve_scraping", "_selected_action": [str(node.pk)]}
    reply = client.post("/admin/fleet/node/", form, follow=True)
    assert "nothing to approve" in reply.content.decode()
    node.refresh_from_db()
    assert not node.scrape_approved and len(targets().json()) == 1  # listed anyway


def test_heartbeat_replies_carry_the_scrape_tokens_hash_never_the_token(settings, alice):
    node, secret = enrolled_node(alice)
    agent = APIClient()
    agent.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    body = {"node_id": str(node.pk), "results": []}
    reply = agent.post("/api/v1/agent/heartbeat", body, format="json")
    expected = hashlib.sha256(b"agents-scrape-token-0123456789").hexdigest()
    assert reply.json()["scrape_token_sha256"] == expected
    assert "agents-scrape-token" not in reply.content.decode()
    settings.AGENT_SCRAPE_TOKEN = ""
    reply = agent.post("/api/v1/agent/heartbeat", body, format="json")
    assert reply.json()["scrape_token_sha256"] is None
