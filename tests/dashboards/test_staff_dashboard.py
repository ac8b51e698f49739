"""The staff dashboard (/staff/, dashboards.views): staff only, the economics API's numbers for
the same fleet, the assumptions form with its errors beside the fields, and the fleet's health
with links into the admin."""

import json
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
from django.test import Client
from django.utils import timezone

from billing import economics
from billing.models import EconomicAssumptions, ReconciliationIssue
from fleet.models import Host
from monitoring.models import Alert
from tests.billing.test_economics import build_fleet
from tests.platform.conftest import account, api_client_for, make_customer

pytestmark = pytest.mark.django_db


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def staff_user(db):
    return make_customer(f"staff{uuid.uuid4().hex[:6]}", staff=True)


@pytest.fixture
def people(db):
    return {name: make_customer(f"{name}{uuid.uuid4().hex[:6]}") for name in
            ("alice", "bob", "carol", "dave")}  # fmt: skip


@pytest.fixture
def frozen_now(monkeypatch):
    """One moment for the page and the API alike: the report's window, month ends and
    30-days-ago are computed from it."""
    now = timezone.now().replace(microsecond=0)
    monkeypatch.setattr(economics, "timezone", SimpleNamespace(now=lambda: now))
    return now


def embedded_report(html: str) -> dict:
    found = re.search(r'<script id="economics-data" type="application/json">(.*?)</script>', html)
    assert found, "the page embeds no economics report"
    return json.loads(found.group(1))


@pytest.mark.parametrize("path", ["/staff/", "/staff/data.json"])
def test_anonymous_visitors_are_sent_to_sign_in(client, path):
    reply = client.get(path)
    assert reply.status_code == 302
    assert reply["Location"] == f"/accounts/login/?next={path}"


@pytest.mark.parametrize(
    "method, path",
    [("get", "/staff/"), ("get", "/staff/data.json"), ("post", "/staff/assumptions")],
)
def test_customers_are_refused(people, method, path):
    reply = getattr(signed_in(people["alice"]), method)(path, {"burn_usd_per_month": "1"})
    assert reply.status_code == 403
    assert not EconomicAssumptions.objects.exists()


def test_staff_see_the_page_under_the_strict_policy(staff_user):
    reply = signed_in(staff_user).get("/staff/")
    assert reply.status_code == 200
    policy = reply["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "style-src 'self';" in policy
    html = reply.content.decode()
    for heading in ("MRR over time", "Paying accounts and churn", "Burn coverage",
                    "Cost per trillion ops", "Break-even per host",
                    "3-year ROI per deployment scenario", "Nodes by state", "Open alerts",
                    "Hosts and their capacity", "Benchmark regressions",
                    "Reconciliation mismatches"):  # fmt: skip
        assert heading in html
    assert "<script>" not in html and " style=" not in html  # nothing inline runs or styles


def test_the_numbers_are_the_economics_apis_for_the_same_fleet(people, staff_user, frozen_now):
    build_fleet(people, frozen_now)
    api = api_client_for(staff_user).get("/api/v1/economics?days=30")
    assert api.status_code == 200
    expected = api.json()
    assert expected["revenue"]["mrr"]["value"] == "450.00"  # the fleet is not empty

    staff = signed_in(staff_user)
    data = staff.get("/staff/data.json?days=30")
    assert data.status_code == 200
    assert data.json()["economics"] == expected

    page = staff.get("/staff/?days=30")
    assert embedded_report(page.content.decode()) == expected  # what the charts draw
    html = page.content.decode()
    fleet_cost = expected["cost_per_trillion_ops"]["fleet"]["value"]
    assert f"<strong>{fleet_cost}</strong> USD per 10^12 ops" in html
    for row in expected["break_even"]:
        hours = row["hours_to_repay_from_revenue"]["value"]
        assert f"<strong>{hours}</strong> hours" in html
    for scenario in expected["roi_3_years"].values():
        shown = scenario["value"] or scenario["reason"]
        assert shown in html
    assert f"<strong>{expected['revenue']['burn_coverage']['value']}</strong>" in html


def test_a_bad_window_is_refused_with_its_reason(staff_user):
    staff = signed_in(staff_user)
    for days in ("0", "366", "week"):
        assert staff.get(f"/staff/?days={days}").status_code == 400
        reply = staff.get(f"/staff/data.json?days={days}")
        assert reply.status_code == 400
        assert "whole number of days from 1 to 365" in reply.json()["detail"]


def test_staff_change_the_assumptions_through_the_form(staff_user):
    staff = signed_in(staff_user)
    reply = staff.post(
        "/staff/assumptions",
        {"electricity_usd_per_kwh": "0.31", "burn_usd_per_month": "5000"},
    )
    assert reply.status_code == 302 and reply["Location"] == "/staff/"
    row = EconomicAssumptions.objects.get()
    assert row.electricity_usd_per_kwh == Decimal("0.31")
    assert row.burn_usd_per_month == Decimal(5000)
    assert row.host_hardware_cost_usd == Decimal(1500)  # not given: kept
    assert row.updated_by == staff_user
    page = staff.get("/staff/").content.decode()
    assert "Assumptions saved" in page
    assert 'name="electricity_usd_per_kwh" value="0.3100"' in page
    assert f"by {staff_user.username}" in page


def test_bad_assumptions_are_shown_beside_their_fields_and_nothing_is_saved(staff_user):
    reply = signed_in(staff_user).post(
        "/staff/assumptions",
        {
            "electricity_usd_per_kwh": "cheap",
            "amortisation_months": "0",
            "burn_usd_per_month": "2500",
        },
    )
    assert reply.status_code == 400
    html = reply.content.decode()
    assert not EconomicAssumptions.objects.exists()
    for name, words in [
        ("electricity_usd_per_kwh", "A valid number is required."),
        ("amortisation_months", "greater than or equal to 1"),
    ]:
        field = re.search(rf'<input id="id_{name}"[^>]*>\s*<p class="error" id="err_{name}">'
                          r"([^<]*)</p>", html)  # fmt: skip
        assert field, f"no error beside {name}"
        assert words in field.group(1)
        assert f'aria-describedby="err_{name}"' in html
    assert 'name="electricity_usd_per_kwh" value="cheap"' in html  # what was typed stays
    assert 'id="err_burn_usd_per_month"' not in html


def alert(node, rule, summary, *, opened_at, state="open", workload=""):
    return Alert.objects.create(
        node=node,
        account=node.account,
        rule=rule,
        workload=workload,
        severity="warning",
        summary=summary,
        state=state,
        opened_at=opened_at,
    )


def test_the_fleets_health_links_into_the_admin(people, staff_user):
    alice = people["alice"]
    host = Host.objects.create(name="rack-1", kind=Host.Kind.LOCAL, capacity=3)
    build_fleet(people, timezone.now())
    node = account(alice).nodes.first()
    now = timezone.now()
    down = alert(node, Alert.Rule.NODE_DOWN, "Node n1 is down.", opened_at=now)
    slow = alert(node, Alert.Rule.SLOWER_THAN_MEDIAN, "Benchmark gemm is slower than usual.",
                 opened_at=now - timedelta(days=2), state="resolved", workload="gemm")  # fmt: skip
    alert(node, Alert.Rule.INCORRECT_RESULT, "An old wrong result.",
          opened_at=now - timedelta(days=30), state="resolved")  # fmt: skip
    issue = ReconciliationIssue.objects.create(
        kind=ReconciliationIssue.Kind.QUANTITY_MISMATCH, key="sub_123", account=account(alice),
        detail="Stripe bills 2 nodes, we run 3.", last_seen=now,
    )  # fmt: skip
    ReconciliationIssue.objects.create(kind="unknown_subscription", key="sub_gone", detail="old",
                                       last_seen=now, resolved_at=now)  # fmt: skip

    html = signed_in(staff_user).get("/staff/").content.decode()
    assert f'href="/admin/monitoring/alert/{down.pk}/change/"' in html
    assert "Node n1 is down." in html
    assert f'href="/admin/monitoring/alert/{slow.pk}/change/"' in html  # a regression this week
    assert "An old wrong result." not in html
    assert f'href="/admin/billing/reconciliationissue/{issue.pk}/change/"' in html
    assert "Stripe bills 2 nodes, we run 3." in html and "sub_gone" not in html
    assert f'href="/admin/fleet/host/{host.pk}/change/">rack-1</a>' in html
    assert "0 / 3" in html  # rack-1: no live node of its capacity of 3
    h1 = Host.objects.get(name="h1")
    assert re.search(rf'/admin/fleet/host/{h1.pk}/change/">h1</a></td>\s*<td>3 / 4', html)
    ready = re.search(r'state__exact=ready">ready</a></td><td>(\d+)</td>', html)
    assert ready and int(ready.group(1)) == 4  # n1..n4 of the economics fleet
