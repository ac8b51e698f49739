"""Uptime from flips, exact to the second across a month boundary, with maintenance and a
suspension; SLA credits recorded exactly once per node and month (controlled time: transitions
are written at chosen instants)."""

from datetime import UTC, date, datetime, timedelta

import pytest
from django.db import connection

from fleet.models import NodeTransition
from monitoring.models import MaintenanceWindow, SlaCredit, SlaMonthClosed
from monitoring.services import MonitoringError, credit_percent, sla_month_close
from monitoring.uptime import month_bounds, node_flips, node_uptime, node_uptime_30_days
from tests.concurrency import at_once

pytestmark = pytest.mark.django_db


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def history(node, *moves: tuple[str, str, str, str]) -> None:
    """Replace the node's transitions with (time, from, to, cause) rows."""
    NodeTransition.objects.filter(node=node).delete()
    for when, from_state, to_state, cause in moves:
        row = NodeTransition.objects.create(
            node=node, from_state=from_state, to_state=to_state, cause=cause
        )
        NodeTransition.objects.filter(pk=row.pk).update(created=at(when))


@pytest.fixture
def served_node(alice_node, local_host):
    """Ready on 20 Oct; down 10 min across midnight 31 Oct/1 Nov; down 45 min on 5 Nov of which
    30 in a host maintenance window; suspended by billing 10-12 Nov; failed (after serving)
    for the last 2 hours of November; deleted on 1 Dec."""
    history(
        alice_node,
        ("2026-10-20 09:00:00", "", "requested", "requested"),
        ("2026-10-20 09:00:30", "requested", "provisioning", "job 1 started"),
        ("2026-10-20 09:01:00", "provisioning", "ready", "first heartbeat"),
        ("2026-10-31 23:50:00", "ready", "degraded", "no heartbeat for 45 s"),
        ("2026-11-01 00:10:00", "degraded", "ready", "heartbeat received again"),
        ("2026-11-05 02:30:00", "ready", "degraded", "health check failed: refused"),
        ("2026-11-05 03:15:00", "degraded", "ready", "heartbeat received again"),
        ("2026-11-10 00:00:00", "ready", "suspended", "suspended by billing: unpaid"),
        ("2026-11-12 00:00:00", "suspended", "ready", "resumed: invoice paid"),
        ("2026-11-30 22:00:00", "ready", "failed", "provisioning job 9 failed"),
        ("2026-12-01 00:00:00", "failed", "deprovisioning", "deleted by alice"),
    )
    MaintenanceWindow.objects.create(
        host=local_host,
        starts_at=at("2026-11-05 02:00:00"),
        ends_at=at("2026-11-05 03:00:00"),
        reason="kernel update",
    )
    return alice_node


NOVEMBER = 30 * 86400


def test_november_is_exact_to_the_second(served_node):
    start, end = month_bounds(date(2026, 11, 1))
    value = node_uptime(served_node, start, end)
    down = 10 * 60 + 15 * 60 + 2 * 3600  # after midnight; after the window; failed at the end
    assert value.down_seconds == down
    assert value.maintenance_seconds == 30 * 60
    assert value.excluded_seconds == 2 * 86400  # the suspension
    assert value.up_seconds == NOVEMBER - down - 30 * 60 - 2 * 86400
    assert value.ratio == pytest.approx(value.up_seconds / (value.up_seconds + down))


def test_october_gets_its_own_side_of_the_midnight_outage(served_node):
    start, end = month_bounds(date(2026, 10, 1))
    value = node_uptime(served_node, start, end)
    assert value.down_seconds == 10 * 60
    served = (at("2026-10-31 23:50:00") - at("2026-10-20 09:01:00")).total_seconds()
    assert value.up_seconds == served
    assert value.excluded_seconds == (at("2026-10-20 09:01:00") - start).total_seconds()


def test_rolling_30_days_spans_the_month_boundary(served_node):
    value = node_uptime_30_days(served_node, now=at("2026-11-15 00:00:00"))
    assert value.down_seconds == 10 * 60 + 10 * 60 + 15 * 60
    assert value.start == at("2026-10-16 00:00:00")


def test_flips_are_the_up_down_changes_with_their_causes(served_node):
    flips = node_flips(served_node)
    assert [(f.up, f.cause) for f in flips] == [
        (True, "first heartbeat"),
        (False, "no heartbeat for 45 s"),
        (True, "heartbeat received again"),
        (False, "health check failed: refused"),
        (True, "heartbeat received again"),
        (True, "resumed: invoice paid"),  # serving again after a stretch that did not count
        (False, "provisioning job 9 failed"),
    ]


def test_a_month_below_the_sla_gets_exactly_one_credit_even_when_closed_twice(
    served_node, settings
):
    settings.SLA_TARGET = 0.999
    with pytest.raises(MonitoringError, match="not ended"):
        sla_month_close(month=date(2026, 11, 1), now=at("2026-11-30 23:59:59"))
    assert sla_month_close(month=date(2026, 11, 1), now=at("2026-12-01 00:00:01")) == 1
    assert sla_month_close(month=date(2026, 11, 1), now=at("2026-12-02 00:00:00")) == 0
    credit = SlaCredit.objects.get()
    assert credit.month == date(2026, 11, 1) and credit.node == served_node
    assert credit.down_seconds == 10 * 60 + 15 * 60 + 2 * 3600
    assert credit.credit_percent == credit_percent(credit.uptime_ratio) == 10
    # October: 10 minutes down in 11.6 days served is above 99.9 %: no credit.
    assert sla_month_close(month=date(2026, 10, 1), now=at("2026-12-02 00:00:00")) == 0


def test_the_credit_schedule(settings):
    assert credit_percent(0.9995) == 0
    assert credit_percent(0.995) == 10
    assert credit_percent(0.98) == 25
    assert credit_percent(0.5) == 100
    # A plan's own target and credit; a deeper breach still owes at least the schedule's share.
    assert credit_percent(0.9995, target=0.9999, percent=20) == 20
    assert credit_percent(0.98, target=0.9999, percent=20) == 25
    assert credit_percent(0.98, target=0.9999, percent=40) == 40
    assert credit_percent(0.995, target=0.99, percent=20) == 0


def test_a_nodes_plan_sets_its_sla(served_node, alice_api):
    """November at 99.64 %: below the default 99.9 % (10 %), above a plan's 99 % (no credit);
    another plan promising 99.99 % with a 20 % credit owes 20 %."""
    from billing.models import Plan

    lenient = Plan.objects.create(name="own machine", amount_cents=5000, sla_target=0.99)
    strict = Plan.objects.create(
        name="premium", amount_cents=40000, sla_target=0.9999, sla_credit_percent=20
    )
    served_node.plan = lenient
    served_node.save(update_fields=["plan"])
    assert sla_month_close(month=date(2026, 11, 1), now=at("2026-12-01 00:00:01")) == 0
    report = alice_api.get("/api/v1/sla?month=2026-11").json()
    assert report["results"][0]["sla_target"] == 0.99
    assert report["results"][0]["meets_sla"] is True
    uptime = alice_api.get(f"/api/v1/nodes/{served_node.pk}/uptime?month=2026-11").json()
    assert uptime["sla_target"] == 0.99

    SlaMonthClosed.objects.all().delete()
    served_node.plan = strict
    served_node.save(update_fields=["plan"])
    assert sla_month_close(month=date(2026, 11, 1), now=at("2026-12-01 00:00:02")) == 1
    credit = SlaCredit.objects.get()
    assert (credit.sla_target, credit.credit_percent) == (0.9999, 20)


@pytest.mark.django_db(transaction=True)
def test_concurrent_month_closes_record_one_credit(served_node):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises writers: concurrency is exercised on PostgreSQL (CI)")
    results, errors = at_once(
        lambda: sla_month_close(month=date(2026, 11, 1), now=at("2026-12-01 01:00:00")), 3
    )
    assert not errors
    assert sum(results) == 1 and SlaCredit.objects.count() == 1


def test_the_api_shows_uptime_flips_maintenance_and_the_sla_report(
    served_node, alice_api, bob_api, monkeypatch
):
    from django.utils import timezone

    monkeypatch.setattr(timezone, "now", lambda: at("2026-12-01 06:00:00"))
    base = f"/api/v1/nodes/{served_node.pk}"
    body = alice_api.get(f"{base}/uptime?month=2026-11").json()
    assert body["month"] == "2026-11" and body["sla_target"] == 0.999
    assert body["this_month"]["down_seconds"] == 10 * 60 + 15 * 60 + 2 * 3600
    assert body["this_month"]["maintenance_seconds"] == 1800
    assert alice_api.get(f"{base}/uptime?month=2026-13").status_code == 400
    assert alice_api.get(f"{base}/uptime?month=nov").status_code == 400
    flips = alice_api.get(f"{base}/flips").json()
    assert flips[1] == {
        "at": "2026-10-31T23:50:00Z",
        "up": False,
        "cause": "no heartbeat for 45 s",
        "category": "heartbeat_late",
    }
    windows = alice_api.get(f"{base}/maintenance").json()
    assert [(w["scope"], w["reason"]) for w in windows] == [("host", "kernel update")]
    sla_month_close(month=date(2026, 11, 1), now=timezone.now())
    report = alice_api.get("/api/v1/sla?month=2026-11").json()
    assert report["closed"] is True
    (row,) = report["results"]
    assert row["node"] == str(served_node.pk) and row["meets_sla"] is False
    assert row["credit_percent"] == 10
    # The account as a whole: one node, so its figures; up and down seconds over all nodes.
    down = 10 * 60 + 15 * 60 + 2 * 3600
    counted = 30 * 86400 - 2 * 86400 - 1800  # November less the suspension and maintenance
    assert report["account"]["down_seconds_this_month"] == down
    assert report["account"]["this_month"] == pytest.approx((counted - down) / counted)
    assert bob_api.get("/api/v1/sla?month=2026-11").json()["results"] == []
    assert bob_api.get(f"{base}/uptime").status_code == 404


def test_a_fleet_wide_window_applies_to_every_node(alice_node):
    history(
        alice_node,
        ("2026-11-01 00:00:00", "provisioning", "ready", "up"),
        ("2026-11-02 00:00:00", "ready", "degraded", "down"),
        ("2026-11-02 01:00:00", "degraded", "ready", "up again"),
    )
    MaintenanceWindow.objects.create(
        starts_at=at("2026-11-02 00:30:00"), ends_at=at("2026-11-02 02:00:00"), reason="network"
    )
    value = node_uptime(alice_node, at("2026-11-01 00:00:00"), at("2026-11-03 00:00:00"))
    assert (value.down_seconds, value.maintenance_seconds) == (1800, 1800)
    assert value.up_seconds == 2 * 86400 - 3600
    assert value.start + timedelta(days=2) == value.end
