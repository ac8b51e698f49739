"""billing.economics, its staff API and `manage.py economics`: every figure checked against
arithmetic done by hand (in the comments) from a small fleet of known telemetry, subscriptions
and invoices; figures that cannot be computed are null with their reason.

Rows are made directly (made-up Stripe ids): the economics read the database only."""

import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from billing.economics import economics_report, jsonable
from billing.models import EconomicAssumptions, Invoice, Plan, Subscription
from fleet.models import Host, Node, TelemetrySample
from tests.platform.conftest import account, api_client_for, make_customer

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
T0 = NOW - timedelta(hours=3)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
RAPL = "RAPL package energy (intel-rapl:0)"
MODEL = "model: idle + (TDP - idle) x host CPU utilisation from /proc/stat (TDP 65 W configured)"


def at(model, pk, when) -> None:
    model.objects.filter(pk=pk).update(created=when)


def node(owner, name, *, host=None, plan=None, state="ready") -> Node:
    return Node.objects.create(
        account=account(owner),
        name=name,
        kind=Node.Kind.PROVISIONED if host else Node.Kind.ENROLLED,
        host=host,
        plan=plan,
        state=state,
        access_token="t",
        access_token_sha256=uuid.uuid4().hex,
    )


def sample(n, when, *, ops, uptime, joules=None, power=MODEL, gops=None) -> None:
    data = {
        "ops": ops,
        "uptime_seconds": uptime,
        "lifetime": {"energy_joules": joules},
        "sources": {"power_watts": power},
    }
    at(TelemetrySample, TelemetrySample.objects.create(node=n, data=data, throughput_gops=gops).pk,
       when)  # fmt: skip


def subscription(owner, plan, status, quantity, created, ended_at=None) -> Subscription:
    s = Subscription.objects.create(
        account=account(owner),
        plan=plan,
        stripe_subscription_id=f"sub_{uuid.uuid4().hex[:12]}",
        status=status,
        quantity=quantity,
        ended_at=ended_at,
    )
    at(Subscription, s.pk, created)
    return s


def invoice(sub, *, paid_cents, period_start, paid_at) -> None:
    Invoice.objects.create(
        account=sub.account,
        subscription=sub,
        stripe_invoice_id=f"in_{uuid.uuid4().hex[:12]}",
        status="paid",
        currency="usd",
        total_cents=paid_cents,
        amount_due_cents=paid_cents,
        amount_paid_cents=paid_cents,
        period_start=period_start,
        stripe_created=period_start,
        paid_at=paid_at,
    )


@pytest.fixture
def people(db):
    return {name: make_customer(f"{name}{uuid.uuid4().hex[:6]}") for name in
            ("alice", "bob", "carol", "dave")}  # fmt: skip


@pytest.fixture
def fleet(people):
    return build_fleet(people, NOW)


@pytest.fixture
def live_fleet(people):
    """The same fleet, at the real now (the API and the command compute at the real now)."""
    return build_fleet(people, timezone.now())


def build_fleet(people, now):
    """Host h1 (1460 USD, 100 h in service) with alice's n1 and n4 and bob's n2; carol's own
    machine n3. Assumptions: 0.20 USD/kWh; 1460 USD over 20 months of 730 h = 0.10 USD/h of
    hardware; 50 W modelled; a cloud TPU hour 2.00 USD for 1e9 ops/s; burn 1000 USD/month."""
    t0 = now - 3 * HOUR
    alice, bob, carol, dave = (people[k] for k in ("alice", "bob", "carol", "dave"))
    EconomicAssumptions.objects.create(
        electricity_usd_per_kwh=Decimal("0.20"),
        host_hardware_cost_usd=Decimal(1460),
        amortisation_months=20,
        modelled_watts_per_node=Decimal(50),
        cloud_tpu_usd_per_hour=Decimal("2.00"),
        cloud_tpu_ops_per_second=1e9,
        burn_usd_per_month=Decimal(1000),
    )
    p200 = Plan.objects.create(name="econ node", amount_cents=20000)
    own = Plan.objects.create(name="econ own", amount_cents=5000, node_kind="enrolled")
    h1 = Host.objects.create(name="h1", kind=Host.Kind.LOCAL)
    Host.objects.filter(pk=h1.pk).update(created=now - 100 * HOUR)
    Host.objects.create(name="h2-retired", is_active=False)  # no nodes: no break-even row
    n1 = node(alice, "n1", host=h1, plan=p200)
    n2 = node(bob, "n2", host=h1, plan=p200)
    n3 = node(carol, "n3", plan=own)
    n4 = node(alice, "n4", host=h1, plan=p200)

    # n1: RAPL; 7.2e12 ops in 2 h (1e9 ops/s); 720 000 J = 0.2 kWh of package energy. Its
    # middle sample's power window was too short, but its energy counter is RAPL's all the same.
    short = "null: window of 0.10 s is too short to measure power; poll again. Source when" \
        f" measured: {RAPL}"  # fmt: skip
    for i, (ops, joules) in enumerate([(0, 0), (3.6e12, 360_000), (7.2e12, 720_000)]):
        sample(n1, t0 + i * HOUR, ops=int(ops), uptime=1000 + i * 3600, joules=joules,
               power=short if i == 1 else RAPL, gops=50.0)  # fmt: skip
    # n2: modelled power; 1.8e12 ops in the first hour, then its agent restarted and counted
    # 0.9e12 since: 2.7e12 ops in 2 h (3.75e8 ops/s).
    sample(n2, t0, ops=0, uptime=500)
    sample(n2, t0 + HOUR, ops=int(1.8e12), uptime=4100)
    sample(n2, t0 + 2 * HOUR, ops=int(0.9e12), uptime=600, gops=30.0)
    # n3 (enrolled, no power source at all): 1.44e12 ops in 4 h (1e8 ops/s).
    sample(n3, now - 4 * HOUR, ops=int(1e12), uptime=10, power=None)
    sample(n3, now, ops=int(2.44e12), uptime=14410, power=None, gops=10.0)
    # n4: one sample only: nothing can be counted.
    sample(n4, t0, ops=5, uptime=5)
    # A sample outside the 30-day window changes nothing.
    sample(n1, now - 40 * DAY, ops=int(9e15), uptime=1)

    # MRR: alice 2 x 200 (active) + carol 1 x 50 (past_due counts, as Stripe counts MRR)
    # = 450 USD. bob's ended 10 days ago; dave's never became active.
    sa = subscription(alice, p200, "active", 2, now - 60 * DAY)
    sb = subscription(bob, p200, "canceled", 1, now - 60 * DAY, ended_at=now - 10 * DAY)
    sc = subscription(carol, own, "past_due", 1, now - 5 * DAY)
    subscription(dave, p200, "incomplete", 1, now - DAY)
    invoice(sa, paid_cents=39000, period_start=now - 20 * DAY, paid_at=now - 20 * DAY)
    invoice(sb, paid_cents=20000, period_start=now - 40 * DAY, paid_at=now - 40 * DAY)
    invoice(sc, paid_cents=5000, period_start=now - 5 * DAY, paid_at=now - 5 * DAY)
    return {"n1": n1, "n2": n2, "n3": n3, "n4": n4, "h1": h1}


def by_name(report) -> dict:
    return {row["name"]: row["cost_per_trillion_ops"] for row in report["cost_per_trillion_ops"]
            ["nodes"]}  # fmt: skip


def test_cost_per_trillion_ops_per_node(fleet):
    costs = by_name(economics_report(now=NOW))
    # n1: RAPL 0.2 kWh shared by h1's 2 observed nodes (n1, n2) = 0.1 kWh x 0.20 = 0.02 USD;
    # hardware 0.10 USD/h x 2 h / 2 = 0.10 USD; 0.12 USD / 7.2 trillion ops = 0.016667.
    assert costs["n1"]["value"] == Decimal("0.016667")
    assert costs["n1"]["inputs"]["energy_kwh"] == Decimal("0.1000")
    assert costs["n1"]["inputs"]["ops_delivered"] == 7_200_000_000_000
    assert "measured for 2.0 h: " + RAPL in costs["n1"]["sources"]["energy"]
    # n2: modelled 50 W x 2 h = 0.1 kWh = 0.02 USD; hardware 0.10; 0.12 / 2.7 = 0.044444.
    assert costs["n2"]["value"] == Decimal("0.044444")
    assert costs["n2"]["inputs"]["agent_restarts"] == 1
    assert "modelled for 2.0 h at 50.00 W" in costs["n2"]["sources"]["energy"]
    # n3: its own machine (share 1): 50 W x 4 h = 0.2 kWh = 0.04 USD; hardware 0.10 x 4 =
    # 0.40 USD; 0.44 / 1.44 = 0.305556. Its ops are its own word.
    assert costs["n3"]["value"] == Decimal("0.305556")
    assert "self-reported" in costs["n3"]["sources"]["ops_delivered"]
    assert costs["n1"]["assumptions"]["electricity_usd_per_kwh"] == Decimal("0.2000")
    assert "staff assumption" in costs["n1"]["sources"]["assumptions"]


def test_cost_per_trillion_ops_fleet_wide(fleet):
    fleet_cost = economics_report(now=NOW)["cost_per_trillion_ops"]["fleet"]
    # (0.12 + 0.12 + 0.44) USD / (7.2 + 2.7 + 1.44) trillion = 0.68 / 11.34 = 0.059965.
    assert fleet_cost["value"] == Decimal("0.059965")
    assert fleet_cost["inputs"]["nodes"] == 3
    assert fleet_cost["inputs"]["cost_usd"] == Decimal("0.6800")
    assert fleet_cost["inputs"]["nodes_without_telemetry"] == [str(fleet["n4"])]


def test_a_node_with_one_sample_or_no_ops_is_null_with_its_reason(fleet):
    costs = by_name(economics_report(now=NOW))
    assert costs["n4"]["value"] is None
    assert "fewer than two telemetry samples" in costs["n4"]["reason"]
    sample(fleet["n4"], T0 + HOUR, ops=5, uptime=3605)  # the counter did not move
    costs = by_name(economics_report(now=NOW))
    assert costs["n4"]["value"] is None
    assert costs["n4"]["reason"] == "this node delivered no ops in the window: a cost per op is" \
        " undefined"  # fmt: skip


def test_break_even_per_host(fleet):
    (h1,) = economics_report(now=NOW)["break_even"]
    revenue, cloud = h1["hours_to_repay_from_revenue"], h1["hours_to_repay_vs_cloud_tpu"]
    # Revenue: n1 and n4 (alice's subscription on their plan) 2 x 200 USD / 730 h; bob's n2
    # earns nothing (his subscription ended). Energy per hour: n1 0.02 / 2 h + n2 0.02 / 2 h +
    # n4 (no telemetry: modelled 50 W x 0.20 USD/kWh) 0.01 = 0.03 USD/h.
    # 1460 / (400/730 - 0.03) = 1460 x 730 / (400 - 21.9) = 2818.8 h.
    assert revenue["value"] == Decimal("2818.8")
    assert revenue["inputs"]["energy_usd_per_hour"] == Decimal("0.0300")
    assert revenue["inputs"]["hours_in_service"] == Decimal("100.0")
    # Delivered: 1e9 + 3.75e8 ops/s; at 2 USD per 1e9 ops/s-hour that is 2.75 USD/h;
    # 1460 / (2.75 - 0.03) = 536.8 h.
    assert cloud["inputs"]["delivered_ops_per_second"] == Decimal(1_375_000_000)
    assert cloud["value"] == Decimal("536.8")


def test_break_even_without_revenue_is_null(fleet):
    Subscription.objects.filter(account=account_of(fleet["n1"])).update(status="canceled")
    (h1,) = economics_report(now=NOW)["break_even"]
    assert h1["hours_to_repay_from_revenue"]["value"] is None
    assert h1["hours_to_repay_from_revenue"]["reason"] == "no revenue from this host's nodes"


def account_of(n):
    return n.account


def test_three_year_roi_of_the_seeds_scenarios(fleet):
    roi = economics_report(now=NOW)["roi_3_years"]
    # Delivered per node: 11.34e12 ops / (2 + 2 + 4 h = 28 800 node-seconds) = 3.9375e8 ops/s,
    # worth 0.39375 x 2.00 = 0.7875 USD per hour of cloud TPU; 3 years = 36 x 730 = 26 280 h.
    # Own node: value 0.7875 x 26 280 = 20 695.50; cost 1500 + 8.40 x 36 = 1802.40;
    # (20 695.50 - 1802.40) / 1802.40 = 1048.2 %. The ranch is exactly 5 own nodes
    # (7500 + 42 x 36 = 9012 = 5 x 1802.40), so the same 1048.2 %, on 103 477.50 USD.
    assert roi["own_node"]["value"] == Decimal("1048.2")
    assert roi["own_node"]["inputs"]["value_3_years_usd"] == Decimal("20695.50")
    assert roi["ranch"]["inputs"]["value_3_years_usd"] == Decimal("103477.50")
    assert roi["ranch"]["inputs"]["cost_3_years_usd"] == Decimal(9012)
    assert roi["ranch"]["value"] == Decimal("1048.2")
    # At capacity: mean latest throughput (50 + 30 + 10) / 3 = 30 Gops/s = 60 USD/h;
    # own node (60 x 26 280 - 1802.40) / 1802.40 = 87 383.4 %.
    assert roi["own_node"]["inputs"]["roi_at_capacity_percent"] == Decimal("87383.4")
    # Managed, per node: revenue 450 USD MRR / 3 billed nodes = 150 USD/month; hardware
    # 1460 / 3 live nodes on h1 = 486.67; energy (0.02 + 0.02 + 0.04) USD / 8 node-hours =
    # 0.01 USD/h = 7.30 a month. Cost 486.67 + 7.30 x 36 = 749.47; revenue 150 x 36 = 5400;
    # (5400 - 749.47) / 749.47 = 620.5 %.
    managed = roi["managed"]
    assert managed["inputs"]["revenue_usd_per_node_month"] == Decimal("150.00")
    assert managed["inputs"]["cost_3_years_usd"] == Decimal("749.47")
    assert managed["value"] == Decimal("620.5")


def test_revenue_figures(fleet):
    revenue = economics_report(now=NOW)["revenue"]
    assert revenue["mrr"]["value"] == Decimal("450.00")  # 2 x 200 + 1 x 50
    assert revenue["paying_accounts"]["value"] == 2  # alice, carol
    # 30 days ago alice and bob paid; bob no more: 1 / 2.
    assert revenue["churn_monthly"]["value"] == Decimal("50.0")
    assert revenue["revenue_per_node"]["value"] == Decimal("112.50")  # 450 / 4 live nodes
    assert revenue["revenue_collected_30_days"]["value"] == Decimal("440.00")  # 390 + 50
    assert revenue["burn_coverage"]["value"] == Decimal("45.0")  # 450 / 1000
    assert revenue["burn_coverage"]["assumptions"] == {"burn_usd_per_month": Decimal("1000.00")}


def test_mrr_history(fleet):
    history = {m["month"]: m for m in economics_report(now=NOW)["mrr_history"]}
    assert len(history) == 12 and "2025-12" in history and "2026-11" in history
    # alice and bob subscribed on 2026-09-16: at the end of September and of October 400 + 200;
    # now alice 400 + carol 50. Paid: alice's 390 and bob's 200 for periods starting in
    # October, carol's 50 in November.
    assert history["2026-08"]["mrr_usd"] == Decimal("0.00")
    assert history["2026-09"]["mrr_usd"] == Decimal("600.00")
    assert history["2026-10"]["mrr_usd"] == Decimal("600.00")
    assert history["2026-11"]["mrr_usd"] == Decimal("450.00")
    assert history["2026-10"]["paid_usd"] == Decimal("590.00")
    assert history["2026-11"]["paid_usd"] == Decimal("50.00")
    assert history["2026-10"]["paying_accounts"] == 2


def test_an_empty_fleet_has_null_figures_with_reasons(db):
    report = economics_report(now=NOW)
    assert report["assumptions"]["source"] == "defaults: staff have saved no assumptions yet"
    assert report["cost_per_trillion_ops"]["fleet"]["value"] is None
    assert "fewer than two telemetry samples" in report["cost_per_trillion_ops"]["fleet"]["reason"]
    roi = report["roi_3_years"]
    assert roi["ranch"]["value"] is None
    assert roi["ranch"]["reason"] == "no node's telemetry in the window: no measured throughput"
    assert roi["managed"]["reason"] == "no subscription counted in MRR: no actual revenue per node"
    revenue = report["revenue"]
    assert revenue["mrr"]["value"] == Decimal("0.00")
    assert revenue["churn_monthly"]["value"] is None
    assert revenue["churn_monthly"]["reason"] == "no account was paying 30 days ago"
    assert revenue["revenue_per_node"]["reason"] == "no live node (ready, degraded or suspended)"


def test_the_window_bounds_the_telemetry(fleet):
    costs = by_name(economics_report(now=NOW, days=1))
    assert costs["n1"]["inputs"]["ops_delivered"] == 7_200_000_000_000
    with pytest.raises(ValueError, match="days must be between 1 and 365"):
        economics_report(days=0)


# ---- the staff API ------------------------------------------------------------------------


@pytest.fixture
def staff_api(db):
    return api_client_for(make_customer(f"staff{uuid.uuid4().hex[:6]}", staff=True))


def test_staff_get_the_report_as_the_module_computes_it(live_fleet, staff_api):
    reply = staff_api.get("/api/v1/economics")
    assert reply.status_code == 200
    body = reply.json()
    expected = jsonable(economics_report())
    assert body["cost_per_trillion_ops"] == expected["cost_per_trillion_ops"]
    assert body["revenue"]["mrr"]["value"] == "450.00"
    assert body["window"]["days"] == 30
    assert staff_api.get("/api/v1/economics?days=7").json()["window"]["days"] == 7
    bad = staff_api.get("/api/v1/economics?days=0")
    assert bad.status_code == 400 and "days" in bad.json()


def test_customers_get_403(people):
    client = api_client_for(people["alice"])
    for reply in (
        client.get("/api/v1/economics"),
        client.get("/api/v1/economics/assumptions"),
        client.put("/api/v1/economics/assumptions", {"burn_usd_per_month": "1"}, format="json"),
    ):
        assert reply.status_code == 403
        assert reply.json()["detail"].startswith("Staff only")
    assert not EconomicAssumptions.objects.exists()


def test_staff_change_the_assumptions_and_who_did_is_recorded(db, staff_api):
    reply = staff_api.get("/api/v1/economics/assumptions")
    assert reply.status_code == 200
    assert reply.json()["electricity_usd_per_kwh"] == "0.1500"
    assert reply.json()["updated_by"] is None
    reply = staff_api.put(
        "/api/v1/economics/assumptions",
        {"electricity_usd_per_kwh": "0.3100", "cloud_tpu_ops_per_second": 5e12},
        format="json",
    )
    assert reply.status_code == 200, reply.json()
    row = EconomicAssumptions.objects.get()
    assert row.electricity_usd_per_kwh == Decimal("0.3100")
    assert row.cloud_tpu_ops_per_second == 5e12
    assert row.host_hardware_cost_usd == Decimal(1500)  # not given: kept
    assert row.updated_by.username.startswith("staff")
    assert reply.json()["updated_by"] == row.updated_by.username
    report = economics_report()
    assert report["assumptions"]["electricity_usd_per_kwh"] == Decimal("0.3100")
    assert "set by staff" in report["assumptions"]["source"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"electricity_usd_per_kwh": "-1"}, "electricity_usd_per_kwh"),
        ({"amortisation_months": 0}, "amortisation_months"),
        ({"host_hardware_cost_usd": "0"}, "host_hardware_cost_usd"),
        ({"cloud_tpu_ops_per_second": 0}, "cloud_tpu_ops_per_second"),
        ({"modelled_watts_per_node": "abc"}, "modelled_watts_per_node"),
        ({"burn_usd_per_month": None}, "burn_usd_per_month"),
        ({"electricity_usd_per_kwh_typo": "0.2"}, "electricity_usd_per_kwh_typo"),
    ],
)
def test_bad_assumptions_get_400_with_reasons(db, staff_api, body, field):
    reply = staff_api.put("/api/v1/economics/assumptions", body, format="json")
    assert reply.status_code == 400
    assert reply.json()[field][0]
    assert not EconomicAssumptions.objects.exists()


# ---- manage.py economics --------------------------------------------------------------------


def test_the_command_prints_each_figure_with_its_inputs(live_fleet):
    out = io.StringIO()
    call_command("economics", stdout=out)
    text = " ".join(out.getvalue().split())  # unwrapped
    assert "Cost per trillion ops" in text
    assert "fleet: 0.059965 USD per 10^12 ops" in text
    assert "node n4" in text and "null (fewer than two telemetry samples" in text
    assert "h1, against a cloud TPU: 536.8 hours" in text
    assert "mrr: 450.00 USD per month" in text
    assert "source of energy: modelled for 2.0 h at 50.00 W" in text
    assert f"{timezone.now():%Y-%m} MRR 450.00 USD" in text


def test_the_command_speaks_json_and_refuses_a_bad_window(live_fleet):
    out = io.StringIO()
    call_command("economics", "--json", "--days", "7", stdout=out)
    report = json.loads(out.getvalue())
    assert report["window"]["days"] == 7
    assert report["revenue"]["paying_accounts"]["value"] == 2
    with pytest.raises(CommandError, match="--days must be between 1 and 365"):
        call_command("economics", "--days", "0")


def test_staff_add_assumptions_in_the_admin_as_a_new_row(client):
    staff = make_customer(f"staff{uuid.uuid4().hex[:6]}", staff=True)
    client.force_login(staff)
    assert client.get("/admin/billing/economicassumptions/").status_code == 200
    form = client.get("/admin/billing/economicassumptions/add/").content.decode()
    # Prefilled with the current (here the default) values.
    assert 'name="electricity_usd_per_kwh" value="0.15' in form
    reply = client.post(
        "/admin/billing/economicassumptions/add/",
        {
            "electricity_usd_per_kwh": "0.25",
            "host_hardware_cost_usd": "2000",
            "amortisation_months": "24",
            "modelled_watts_per_node": "40",
            "cloud_tpu_usd_per_hour": "1.50",
            "cloud_tpu_ops_per_second": "3e12",
            "burn_usd_per_month": "15000",
        },
    )
    assert reply.status_code == 302
    row = EconomicAssumptions.objects.get()
    assert row.updated_by == staff and row.electricity_usd_per_kwh == Decimal("0.25")
    assert economics_report()["assumptions"]["host_hardware_cost_usd"] == Decimal(2000)


def test_the_staff_answers_are_the_shape_the_openapi_schema_promises(live_fleet, staff_api):
    # The contract test (tests/platform/test_api_contract.py) calls as a customer: 403 only.
    import requests
    import schemathesis
    from schemathesis.core.transport import Response
    from schemathesis.specs.openapi import checks

    schema = schemathesis.openapi.from_dict(staff_api.get("/api/v1/schema/?format=json").json())
    put = {"burn_usd_per_month": "900.00"}
    auth = {"Authorization": staff_api._credentials["HTTP_AUTHORIZATION"]}
    for path, method in [
        ("/api/v1/economics", "GET"),
        ("/api/v1/economics/assumptions", "GET"),
        ("/api/v1/economics/assumptions", "PUT"),
    ]:
        if method == "PUT":
            reply = staff_api.put(path, put, format="json")
            case = schema[path][method].Case(body=put, media_type="application/json")
        else:
            reply = staff_api.get(path)
            case = schema[path][method].Case()
        assert reply.status_code == 200, reply.content
        case.validate_response(
            Response(
                status_code=reply.status_code,
                headers={name: [value] for name, value in reply.headers.items()},
                content=reply.content,
                request=requests.Request(
                    method, f"http://testserver{path}", headers=auth
                ).prepare(),
                elapsed=0.0,
                verify=True,
            ),
            checks=[
                checks.status_code_conformance,
                checks.content_type_conformance,
                checks.response_schema_conformance,
            ],
        )
