"""Tenant isolation, over the whole URL conf: a member of account B gets 404 on every one of
account A's objects, on every method. A new endpoint with an object id in its path and no row
in the table below fails `test_every_endpoint_is_in_the_table`."""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from fleet.models import NodeTransition
from fleet.services import enrollment
from tests.platform.conftest import account

pytestmark = pytest.mark.django_db

# Route name -> the methods that act on one object of an account, and which object fills its
# path. Routes without an id in the path (lists, creation) are checked by their contents.
OBJECT_ROUTES = {
    "node-detail": (["get", "delete"], "node"),
    "node-retry": (["post"], "node"),
    "node-suspend": (["post"], "node"),
    "node-resume": (["post"], "node"),
    "node-models": (["post"], "node"),
    "node-jobs": (["get"], "node"),
    "node-transitions": (["get"], "node"),
    "node-actions": (["get", "post"], "node"),
    "node-telemetry": (["get"], "node"),
    "node-credentials": (["get"], "node"),
    "node-credentials-rotate": (["post"], "node"),
    "node-uptime": (["get"], "node"),
    "node-flips": (["get"], "node"),
    "node-maintenance": (["get"], "node"),
    "node-benchmarks": (["get", "post"], "node"),
    "node-benchmark-stats": (["get"], "node"),
    "job-detail": (["get"], "job"),
    "job-events": (["get"], "job"),
    "job-cancel": (["post"], "job"),
    "token-detail": (["delete"], "token"),
    "alert-detail": (["get"], "alert"),
    "channel-detail": (["get", "patch", "delete"], "channel"),
    "billing-invoice-pay": (["post"], "invoice"),
}
LIST_ROUTES = {
    "node-list": "nodes",
    "token-list": "tokens",
    "enrollment-list": "enrollments",
    "sla-report": "the SLA report's nodes",
    "alert-list": "alerts",
    "channel-list": "alert channels",
    "billing-invoices": "invoices",
}
# Not account-scoped: the schema, and the agents' own endpoints (secrets, not accounts), and the
# enrollment link's script and wheel (a one-time secret in the path), and /metrics and the
# Prometheus targets (the operator's scrape token).
UNSCOPED = {
    "schema",
    "enroll",
    "agent-heartbeat",
    "enroll-install",
    "enroll-wheel",
    "metrics",
    "prometheus-targets",
    "billing-stripe-webhook",  # Stripe's signature is its credential (tests/billing)
    "billing-plans",  # the catalogue, the same for everyone
    "login",  # signing in and out: no account yet
    "logout",
    "billing-reconciliation",  # staff only (tests/billing/test_reconciliation.py)
    "economics",  # staff only (tests/billing/test_economics.py)
    "economics-assumptions",  # staff only (tests/billing/test_economics.py)
    # The staff dashboard: staff only (tests/dashboards/test_staff_dashboard.py).
    "staff-dashboard",
    "staff-data",
    "staff-assumptions",
    # Signing up, password reset, and an invitation's page (its one-time secret in the path):
    # no account yet (tests/portal/test_account_views.py).
    "signup",
    "password_reset",
    "password_reset_done",
    "password_reset_confirm",
    "password_reset_complete",
    "invitation-accept",
}
# No id in the path: they act on the caller's own account and nothing else (tests/billing).
OWN_ACCOUNT_ROUTES = {
    "billing",
    "billing-setup",
    "billing-payment-method",
    "billing-cancel",
    "billing-card",
    "portal-home",
    "account-team",  # the portal's account pages (tests/portal/test_account_views.py)
    "account-channels",
    "account-tokens",
    "account-billing",
    "account-billing-cancel",
    "account-billing-keep",
    "portal-docs",
    "portal-nodes",  # the node list, deploying, enrolling (tests/portal/test_nodes.py)
    "portal-node-rows",
    "portal-node-deploy",
    "portal-node-enroll",
}

# Portal pages with an object id in the path: each has its own 404 test for another account's
# object in its test module (tests/portal/test_account_views.py, ...).
PORTAL_ROUTES = {
    "account-channel",
    "account-channel-delete",
    "account-token-revoke",
    "account-invoice-pay",
    # A node's pages (tests/portal/test_nodes.py, test_another_accounts_node_is_not_found_...).
    "portal-node",
    "portal-node-status",
    "portal-node-charts",
    "portal-job-log",
    "portal-node-token",
    "portal-node-token-rotate",
    "portal-node-benchmark",
    "portal-node-payment",
    "portal-node-delete",
    "portal-node-suspend",
    "portal-node-resume",
}


def _api_routes(resolver=None, prefix=""):
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            if entry.app_name == "admin" or str(entry.pattern).startswith("admin"):
                continue
            yield from _api_routes(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern) and entry.name:
            yield entry.name, prefix + str(entry.pattern)


def test_every_endpoint_is_in_the_table():
    names = {name for name, _ in _api_routes()}
    unknown = (
        names
        - set(OBJECT_ROUTES)
        - set(LIST_ROUTES)
        - UNSCOPED
        - OWN_ACCOUNT_ROUTES
        - PORTAL_ROUTES
    )
    assert not unknown, f"add these routes to the tenant-isolation table: {sorted(unknown)}"


@pytest.fixture
def alices_things(alice, alice_node):
    from tests.platform.conftest import api_client_for

    api_client_for(alice)  # a token of alice's account
    enrollment.enrollment_create(account=account(alice), user=alice)
    from monitoring.alerts import alert_open
    from monitoring.models import AlertChannel

    alert = alert_open(alice_node, "node_down", severity="critical", summary="down")
    channel = AlertChannel.objects.create(
        account=account(alice), kind="email", name="me", target="alice@example.com"
    )
    from billing.models import Invoice

    invoice = Invoice.objects.create(
        account=account(alice),
        stripe_invoice_id="in_alices",
        status="open",
        currency="usd",
        total_cents=20000,
        amount_due_cents=20000,
        amount_paid_cents=0,
        stripe_created=alice_node.created,
    )
    return {
        "invoice": invoice.pk,
        "alert": alert.pk,
        "channel": channel.pk,
        "node": alice_node.pk,
        "job": alice_node.jobs.get().pk,
        "token": account(alice).api_tokens.first().pk,
    }


@pytest.mark.parametrize("route", sorted(OBJECT_ROUTES))
def test_bob_gets_404_on_alices_objects(route, alices_things, bob_api):
    from django.urls import reverse

    methods, kind = OBJECT_ROUTES[route]
    arg = {
        "node": "node_id",
        "job": "job_id",
        "token": "token_id",
        "alert": "alert_id",
        "channel": "channel_id",
        "invoice": "invoice_id",
    }[kind]
    url = reverse(route, kwargs={arg: alices_things[kind]})
    before = NodeTransition.objects.count()
    for method in methods:
        reply = getattr(bob_api, method)(url, {}, format="json")
        assert reply.status_code == 404, (method, url, reply.content)
        assert "your account" in reply.json()["detail"]
    assert NodeTransition.objects.count() == before  # nothing moved


@pytest.mark.parametrize("route", sorted(LIST_ROUTES))
def test_bobs_lists_hold_nothing_of_alices(route, alices_things, bob_api, alice_api):
    from django.urls import reverse

    url = reverse(route)
    assert alice_api.get(url).json()["results"], "alice's list should not be empty"
    assert bob_api.get(url).json()["results"] == [] or route == "token-list"
    if route == "token-list":
        ids = {t["id"] for t in bob_api.get(url).json()["results"]}
        assert alices_things["token"] not in ids
