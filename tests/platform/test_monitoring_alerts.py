"""Alerts: opened once, reminded, resolved; delivered to e-mail and to signed webhooks (a real
local HTTP receiver) with retries and recorded attempts; customers' channels through the API."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.db import IntegrityError, connection, transaction
from django.test import override_settings

from fleet.models import Node, TelemetrySample
from fleet.services.transitions import try_transition
from monitoring import alerts, notify
from monitoring.models import Alert, AlertChannel, DeliveryAttempt, MaintenanceWindow, Notification
from tests.platform.conftest import account, api_client_for
from tests.receiver import Receiver, signature_valid

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def local_webhooks(settings):
    """The receivers here are on this machine (production refuses private addresses)."""
    settings.WEBHOOK_ALLOW_PRIVATE = True


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def ready_node(alice_node):
    try_transition(alice_node, "provisioning", "job started")
    try_transition(alice_node, "ready", "first heartbeat of its agent")
    return Node.objects.get(pk=alice_node.pk)


@pytest.fixture
def channels(alice, receiver):
    """The customer's webhook, and staff's fleet-wide mail."""
    hook = AlertChannel.objects.create(
        account=account(alice), kind="webhook", name="hook", target=receiver.url, secret="s3cret"
    )
    ops = AlertChannel.objects.create(account=None, kind="email", name="ops", target="ops@x.io")
    return hook, ops


def deliver_all(now: datetime) -> list[str]:
    return [
        notify.notification_deliver(n.pk, now=now)
        for n in Notification.objects.filter(state="pending", next_attempt_at__lte=now)
    ]


def test_a_node_down_opens_one_alert_and_its_recovery_one_resolved_message(
    ready_node, channels, receiver, django_capture_on_commit_callbacks
):
    try_transition(ready_node, "degraded", "no heartbeat for 47 s")
    with django_capture_on_commit_callbacks(execute=True):
        first = alerts.alerts_evaluate(now=NOW)
    again = alerts.alerts_evaluate(now=NOW + timedelta(seconds=15))
    assert first["opened"] == 1 and again["opened"] == 0
    alert = Alert.objects.get()
    assert (alert.rule, alert.severity, alert.state) == ("node_down", "critical", "open")
    assert alert.details["category"] == "heartbeat_late"
    assert "no heartbeat for 47 s" in alert.summary
    assert sorted(Notification.objects.values_list("event", flat=True)) == ["opened", "opened"]

    assert deliver_all(NOW) == ["sent", "sent"]
    headers, body = receiver.requests[0]
    assert signature_valid("s3cret", headers["X-Vtpu-Signature"], body, now=time.time())
    assert not signature_valid("wrong", headers["X-Vtpu-Signature"], body, now=time.time())
    assert not signature_valid(  # a replay an hour later is refused
        "s3cret", headers["X-Vtpu-Signature"], body, now=time.time() + 3600
    )
    message = json.loads(body)
    assert message["event"] == "opened" and message["alert"]["rule"] == "node_down"
    assert message["node"]["url"].endswith(f"/api/v1/nodes/{ready_node.pk}")
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["ops@x.io"]
    assert "FIRING critical" in mail.outbox[0].subject

    try_transition(Node.objects.get(pk=ready_node.pk), "ready", "heartbeat received again")
    done = alerts.alerts_evaluate(now=NOW + timedelta(minutes=3))
    assert done["resolved"] == 1
    alert.refresh_from_db()
    assert alert.state == "resolved" and alert.resolved_at == NOW + timedelta(minutes=3)
    assert deliver_all(NOW + timedelta(minutes=3)) == ["sent", "sent"]
    assert json.loads(receiver.requests[-1][1])["event"] == "resolved"
    assert "RESOLVED" in mail.outbox[-1].subject


def test_no_alert_inside_a_maintenance_window(ready_node, channels):
    MaintenanceWindow.objects.create(
        node=ready_node,
        starts_at=NOW - timedelta(hours=1),
        ends_at=NOW + timedelta(hours=1),
        reason="disk swap",
    )
    try_transition(ready_node, "degraded", "health check failed: refused")
    assert alerts.alerts_evaluate(now=NOW)["opened"] == 0
    assert alerts.alerts_evaluate(now=NOW + timedelta(hours=2))["opened"] == 1
    assert Alert.objects.get().details["category"] == "health_check_failed"


def test_an_alert_cannot_be_open_twice_even_when_written_concurrently(ready_node):
    fields = dict(node=ready_node, account_id=ready_node.account_id, rule="node_down")
    Alert.objects.create(**fields, severity="critical", summary="down", opened_at=NOW)
    with pytest.raises(IntegrityError), transaction.atomic():
        Alert.objects.create(**fields, severity="critical", summary="down", opened_at=NOW)
    assert alerts.alert_open(ready_node, "node_down", severity="critical", summary="x") is None


@override_settings(ALERT_REMINDER_SECONDS=3600)
def test_an_open_alert_is_reminded_once_per_period(ready_node, channels):
    alerts.alert_open(ready_node, "node_down", severity="critical", summary="down", now=NOW)
    assert alerts.alerts_remind(now=NOW + timedelta(minutes=59)) == 0
    assert alerts.alerts_remind(now=NOW + timedelta(minutes=61)) == 1
    assert alerts.alerts_remind(now=NOW + timedelta(minutes=62)) == 0
    events = list(Notification.objects.values_list("event", flat=True))
    assert sorted(events) == ["opened", "opened", "reminder", "reminder"]


@override_settings(ALERT_AGENT_ERRORS=5, ALERT_AGENT_ERRORS_WINDOW_SECONDS=900)
def test_agent_errors_rising_alert_and_clear(ready_node, channels):
    def sample(when: datetime, errors: int) -> None:
        row = TelemetrySample.objects.create(node=ready_node, data={"errors": errors})
        TelemetrySample.objects.filter(pk=row.pk).update(created=when)
        Node.objects.filter(pk=ready_node.pk).update(last_telemetry={"errors": errors})

    sample(NOW - timedelta(seconds=890), 3)
    sample(NOW, 7)  # 4 new: below 5
    assert alerts.alerts_evaluate(now=NOW)["opened"] == 0
    sample(NOW + timedelta(seconds=5), 9)  # 6 new within the window
    assert alerts.alerts_evaluate(now=NOW + timedelta(seconds=5))["opened"] == 1
    alert = Alert.objects.get(rule="agent_errors")
    assert alert.details["new_errors"] == 6 and alert.severity == "warning"
    later = NOW + timedelta(seconds=900)
    sample(later - timedelta(seconds=880), 9)  # the counter stopped growing
    sample(later, 9)
    assert alerts.alerts_evaluate(now=later)["resolved"] == 1


def test_a_failing_webhook_is_retried_with_backoff_for_a_day_and_never_blocks_mail(
    ready_node, channels, receiver
):
    receiver.status = 500
    alerts.alert_open(ready_node, "node_down", severity="critical", summary="down", now=NOW)
    hook = Notification.objects.get(channel__kind="webhook")
    assert sorted(deliver_all(NOW)) == ["pending", "sent"]
    assert len(mail.outbox) == 1  # the mail went, whatever the webhook did
    hook.refresh_from_db()
    assert hook.attempts == 1 and "HTTP 500" in hook.last_error
    assert hook.next_attempt_at == NOW + timedelta(seconds=30)
    notify.notification_deliver(hook.pk, now=NOW + timedelta(seconds=30))
    hook.refresh_from_db()
    assert hook.next_attempt_at == NOW + timedelta(seconds=90)  # 30 s, then 60 s
    # Not due yet: nothing is attempted.
    assert notify.notification_deliver(hook.pk, now=NOW + timedelta(seconds=60)) == "pending"
    assert hook.delivery_attempts.count() == 2
    # After a day of failures it is given up, every attempt on record.
    when = NOW + timedelta(seconds=90)
    Notification.objects.filter(pk=hook.pk).update(created=NOW)
    while notify.notification_deliver(hook.pk, now=when) == "pending":
        hook.refresh_from_db()
        when = hook.next_attempt_at
    hook.refresh_from_db()
    assert hook.state == "failed" and when <= NOW + timedelta(days=1, hours=2)
    attempts = DeliveryAttempt.objects.filter(notification=hook)
    assert attempts.count() == hook.attempts > 5
    assert all(not a.ok and a.status_code == 500 for a in attempts)
    # The receiver comes back: a new message goes through at once.
    receiver.status = 204
    alerts.alert_resolve(ready_node, "node_down", resolution="back", now=when)
    assert "sent" in deliver_all(when)


def test_an_unreachable_webhook_is_recorded_not_raised(ready_node, alice):
    AlertChannel.objects.create(
        account=account(alice),
        kind="webhook",
        name="dead",
        target="http://127.0.0.1:9/x",
        secret="k",
    )
    alerts.alert_open(ready_node, "node_down", severity="critical", summary="down", now=NOW)
    assert deliver_all(NOW) == ["pending"]
    attempt = DeliveryAttempt.objects.get()
    assert not attempt.ok and "cannot reach the receiver" in attempt.error


# ---- the API ----------------------------------------------------------------------------------


def test_channels_through_the_api(alice, bob, receiver):
    api = api_client_for(alice)
    made = api.post(
        "/api/v1/alert-channels",
        {"kind": "webhook", "name": "pager", "target": receiver.url},
        format="json",
    )
    assert made.status_code == 201, made.content
    secret = made.json()["secret"]
    assert len(secret) >= 32
    channel = AlertChannel.objects.get(pk=made.json()["id"])
    assert channel.secret == secret
    with connection.cursor() as cursor:  # encrypted at rest
        cursor.execute("SELECT secret FROM monitoring_alertchannel WHERE id = %s", [channel.pk])
        assert secret not in cursor.fetchone()[0]
    listed = api.get("/api/v1/alert-channels").json()["results"]
    assert [c["name"] for c in listed] == ["pager"] and "secret" not in listed[0]
    rotated = api.patch(
        f"/api/v1/alert-channels/{channel.pk}", {"rotate_secret": True}, format="json"
    )
    assert rotated.status_code == 200 and rotated.json()["secret"] not in ("", secret)
    off = api.patch(f"/api/v1/alert-channels/{channel.pk}", {"enabled": False}, format="json")
    assert off.json()["enabled"] is False and off.json()["secret"] == ""
    assert api_client_for(bob).get(f"/api/v1/alert-channels/{channel.pk}").status_code == 404
    assert api.delete(f"/api/v1/alert-channels/{channel.pk}").status_code == 204
    assert not AlertChannel.objects.filter(pk=channel.pk).exists()


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"kind": "email", "name": "x", "target": "not-an-address"}, "target", "e-mail address"),
        ({"kind": "sms", "name": "x", "target": "+1"}, "kind", "valid choice"),
        ({"kind": "webhook", "name": "x", "target": "ftp://example.com/"}, "target", "http"),
        ({"kind": "webhook", "name": " ", "target": "https://example.com/"}, "name", ""),
    ],
)
def test_bad_channels_get_400_with_the_reason(alice, body, field, words):
    answer = api_client_for(alice).post("/api/v1/alert-channels", body, format="json")
    assert answer.status_code == 400
    assert field in answer.json() and words in json.dumps(answer.json())


@override_settings(WEBHOOK_ALLOW_PRIVATE=False)
@pytest.mark.parametrize(
    "target", ["http://example.com/hook", "https://127.0.0.1/hook", "https://10.1.2.3/x"]
)
def test_production_refuses_webhooks_into_our_network(alice, target):
    answer = api_client_for(alice).post(
        "/api/v1/alert-channels", {"kind": "webhook", "name": "x", "target": target}, format="json"
    )
    assert answer.status_code == 400, answer.content
    assert "target" in answer.json()


@override_settings(WEBHOOK_ALLOW_PRIVATE=False)
def test_a_channel_that_later_points_inside_is_refused_at_delivery(ready_node, alice):
    AlertChannel.objects.create(
        account=account(alice), kind="webhook", name="x", target="https://localhost/x", secret="k"
    )
    alerts.alert_open(ready_node, "node_down", severity="critical", summary="down", now=NOW)
    assert deliver_all(NOW) == ["pending"]
    assert "not a public address" in DeliveryAttempt.objects.get().error


def test_alerts_through_the_api_are_the_accounts_own(ready_node, alice, bob, channels):
    alerts.alert_open(ready_node, "node_down", severity="critical", summary="down", now=NOW)
    api = api_client_for(alice)
    rows = api.get("/api/v1/alerts?state=open").json()["results"]
    assert [(r["rule"], r["node"]) for r in rows] == [("node_down", str(ready_node.pk))]
    assert api.get("/api/v1/alerts?state=resolved").json()["results"] == []
    assert api.get(f"/api/v1/alerts?node={ready_node.pk}").json()["count"] == 1
    assert api.get("/api/v1/alerts?state=shut").status_code == 400
    assert api.get("/api/v1/alerts?node=nope").status_code == 400
    detail = api.get(f"/api/v1/alerts/{rows[0]['id']}").json()
    assert {n["event"] for n in detail["notifications"]} == {"opened"}
    assert api_client_for(bob).get(f"/api/v1/alerts/{rows[0]['id']}").status_code == 404
    assert api_client_for(bob).get("/api/v1/alerts").json()["count"] == 0


def test_flips_carry_their_cause_as_a_category(ready_node, alice):
    try_transition(ready_node, "degraded", "health check failed: HTTP 503")
    try_transition(Node.objects.get(pk=ready_node.pk), "ready", "heartbeat received again")
    flips = api_client_for(alice).get(f"/api/v1/nodes/{ready_node.pk}/flips").json()
    assert [(f["up"], f["category"]) for f in flips] == [
        (True, "recovered"),
        (False, "agent_errors"),
        (True, "recovered"),
    ]


# ---- benchmark rules ----------------------------------------------------------------------


def bench(node, when: datetime, *, speedup: float, opc: float = 3.0, correct=True, workload="gemm"):
    """A finished run with one result, written at `when`, announced as ingest announces it."""
    from monitoring.models import BenchmarkResult, BenchmarkRun
    from monitoring.signals import benchmark_recorded

    run = BenchmarkRun.objects.create(node=node, trigger="schedule", state="done", finished_at=when)
    BenchmarkResult.objects.create(
        run=run,
        node=node,
        workload=workload,
        created=when,
        speedup=speedup,
        ops_per_cycle=opc,
        baseline="numpy",
        correct=correct,
        data={"max_error": 0.5 if correct is False else 1e-6, "tolerance": 1e-3},
    )
    benchmark_recorded.send(sender=BenchmarkRun, run=run)
    return run


def test_a_workload_slower_than_its_7_day_median_alerts_once_and_resolves_once(
    ready_node, channels, monkeypatch
):
    monkeypatch.setattr(alerts.timezone, "now", lambda: NOW)
    for hours, speedup in [(30, 2.0), (20, 2.1), (10, 1.9), (5, 2.05)]:  # median 2.025
        bench(ready_node, NOW - timedelta(hours=hours), speedup=speedup)
    assert not Alert.objects.exists()  # normal runs raise nothing
    bench(ready_node, NOW - timedelta(minutes=2), speedup=1.85)  # 8.6 % below: within margin
    assert not Alert.objects.exists()
    bench(ready_node, NOW - timedelta(minutes=1), speedup=1.6)  # 21 % below
    bench(ready_node, NOW, speedup=1.55)  # still slow: no second alert
    alert = Alert.objects.get()
    assert (alert.rule, alert.workload, alert.severity) == ("slower_than_median", "gemm", "warning")
    assert "7-day median" in alert.summary and alert.details["count"] >= 3
    bench(ready_node, NOW, speedup=2.0)
    alert.refresh_from_db()
    assert alert.state == "resolved" and "within 10%" in alert.resolution
    events = sorted(Notification.objects.values_list("event", flat=True))
    assert events == ["opened", "opened", "resolved", "resolved"]


def test_a_slower_run_with_too_little_history_judges_nothing(ready_node, monkeypatch):
    monkeypatch.setattr(alerts.timezone, "now", lambda: NOW)
    bench(ready_node, NOW - timedelta(hours=1), speedup=2.0)
    bench(ready_node, NOW, speedup=1.0)
    assert not Alert.objects.filter(rule="slower_than_median").exists()


def test_an_incorrect_result_is_a_critical_alert(ready_node, channels, monkeypatch):
    monkeypatch.setattr(alerts.timezone, "now", lambda: NOW)
    bench(ready_node, NOW, speedup=2.0, correct=False)
    alert = Alert.objects.get()
    assert (alert.rule, alert.severity) == ("incorrect_result", "critical")
    assert "INCORRECT" in alert.summary and "0.5" in alert.summary
    bench(ready_node, NOW, speedup=2.0, correct=None)  # not checked: says nothing
    assert Alert.objects.get().state == "open"
    bench(ready_node, NOW, speedup=2.0, correct=True)
    assert Alert.objects.get().state == "resolved"


def test_ops_per_cycle_floor_relative_to_the_nodes_first_runs_or_per_workload(
    ready_node, monkeypatch
):
    from monitoring.models import BenchmarkThreshold

    monkeypatch.setattr(alerts.timezone, "now", lambda: NOW)
    for hours in (9, 8, 7):
        bench(ready_node, NOW - timedelta(hours=hours), speedup=2.0, opc=4.0)
    bench(ready_node, NOW - timedelta(hours=6), speedup=2.0, opc=3.3)  # above 0.8 × 4.0
    assert not Alert.objects.exists()
    bench(ready_node, NOW - timedelta(hours=5), speedup=2.0, opc=3.1)  # below 3.2
    alert = Alert.objects.get(rule="ops_per_cycle_low")
    assert "first runs" in alert.summary and alert.details["floor"] == pytest.approx(3.2)
    bench(ready_node, NOW - timedelta(hours=4), speedup=2.0, opc=3.5)
    assert Alert.objects.get(rule="ops_per_cycle_low").state == "resolved"
    # A workload with its own absolute floor (the seed's 2.8) for a gather.
    BenchmarkThreshold.objects.create(workload="gather", ops_per_cycle_floor=2.8)
    bench(ready_node, NOW, speedup=1.0, opc=2.5, workload="gather")
    gather = Alert.objects.get(rule="ops_per_cycle_low", workload="gather")
    assert "admin" in gather.summary and gather.details["floor"] == 2.8


def test_benchmark_history_is_pruned_after_its_retention(ready_node, settings):
    from monitoring.models import BenchmarkResult, BenchmarkRun
    from monitoring.services import history_prune

    settings.BENCHMARK_RETENTION_DAYS = 30
    old = bench(ready_node, NOW - timedelta(days=31), speedup=2.0)
    BenchmarkRun.objects.filter(pk=old.pk).update(created=NOW - timedelta(days=31))
    kept = bench(ready_node, NOW - timedelta(days=29), speedup=2.0)
    BenchmarkRun.objects.filter(pk=kept.pk).update(created=NOW - timedelta(days=29))
    assert history_prune(now=NOW) == {"benchmark_runs": 1, "benchmark_results": 1}
    assert list(BenchmarkRun.objects.values_list("pk", flat=True)) == [kept.pk]
    assert BenchmarkResult.objects.count() == 1
