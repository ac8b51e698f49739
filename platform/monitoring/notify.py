"""Alert messages to channels: e-mail and signed webhooks (docs/architecture.md, "Alerts").

Every message is a Notification row first (written in the transaction that opened, reminded or
resolved its alert), then delivered by a Celery task; a periodic sweep delivers whatever is due,
so a broker outage or a worker killed mid-send loses nothing. Each notification is delivered on
its own, so a failing channel never blocks the others. A failed attempt is recorded and retried
after NOTIFY_BACKOFF_SECONDS, doubling (at most 2 h), until NOTIFY_RETRY_SECONDS after the
message was written; then it is given up as failed.

Webhooks are JSON POSTs signed like Stripe's: `X-Vtpu-Signature: t=<unix time>,v1=<hex
HMAC-SHA256(secret, "<t>.<body>")>`; a receiver recomputes it with the channel's secret and
refuses a stale `t` (a replay). `X-Vtpu-Delivery` is the notification's id, the same on every
retry, so a receiver can drop a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from fleet.services import queue
from monitoring.models import Alert, AlertChannel, DeliveryAttempt, Notification

log = logging.getLogger(__name__)

DELIVER_TASK = "monitoring.tasks.deliver_notification"
MAX_BACKOFF_SECONDS = 7200
CLAIM_SECONDS = 120  # a delivery in progress is not picked again by the sweep this long
SIGNATURE_HEADER = "X-Vtpu-Signature"


class DeliveryError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ---- writing messages -----------------------------------------------------------------------


def channels_for(alert: Alert):
    """The account's own enabled channels, and staff's fleet-wide ones."""
    return AlertChannel.objects.filter(
        Q(account_id=alert.account_id) | Q(account__isnull=True), enabled=True
    )


def notifications_queue(alert: Alert, event: str, *, now: datetime) -> list[Notification]:
    """One notification per channel, delivered once the current transaction commits."""
    rows = [
        Notification.objects.create(alert=alert, channel=c, event=event, next_attempt_at=now)
        for c in channels_for(alert)
    ]
    for row in rows:
        transaction.on_commit(lambda pk=row.pk: queue.send_task(DELIVER_TASK, pk))
    return rows


# ---- the message ----------------------------------------------------------------------------


def node_link(alert: Alert) -> str:
    return f"{settings.PUBLIC_URL}/api/v1/nodes/{alert.node_id}"


def payload(notification: Notification) -> dict:
    alert = notification.alert
    return {
        "delivery": notification.pk,
        "event": notification.event,
        "alert": {
            "id": alert.pk,
            "rule": alert.rule,
            "severity": alert.severity,
            "state": alert.state,
            "workload": alert.workload or None,
            "summary": alert.summary,
            "details": alert.details,
            "opened_at": alert.opened_at.isoformat(),
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            "resolution": alert.resolution or None,
        },
        "node": {"id": str(alert.node_id), "name": alert.node.name, "url": node_link(alert)},
    }


def subject(notification: Notification) -> str:
    alert = notification.alert
    word = {"opened": "FIRING", "reminder": "STILL FIRING", "resolved": "RESOLVED"}
    return f"[vTPU] {word[notification.event]} {alert.severity}: {alert.summary}"[:200]


def _mail_body(notification: Notification) -> str:
    alert = notification.alert
    lines = [
        alert.summary,
        "",
        f"Node:     {alert.node.name} ({alert.node_id})",
        f"Rule:     {alert.rule}" + (f" / {alert.workload}" if alert.workload else ""),
        f"Severity: {alert.severity}",
        f"Opened:   {alert.opened_at:%Y-%m-%d %H:%M:%S} UTC",
    ]
    if notification.event == "resolved":
        lines.append(f"Resolved: {alert.resolved_at:%Y-%m-%d %H:%M:%S} UTC — {alert.resolution}")
    lines += ["", f"The node: {node_link(alert)}", ""]
    return "\n".join(lines)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


# ---- sending --------------------------------------------------------------------------------


def webhook_url_problem(url: str) -> str | None:
    """Why this URL may not receive webhooks, or None. Private, loopback and link-local
    addresses are refused unless WEBHOOK_ALLOW_PRIVATE (checked again at each delivery, so a
    name that later resolves inside our network is refused then)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "a webhook URL must be an http:// or https:// URL with a host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "the URL's port is not a port number"
    if settings.WEBHOOK_ALLOW_PRIVATE:
        return None
    if parts.scheme != "https":
        return "a webhook URL must be https://"
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        return f"cannot resolve {parts.hostname}: {exc}"
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            return f"{parts.hostname} resolves to {address}, which is not a public address"
    return None


def _send_webhook(channel: AlertChannel, notification: Notification) -> int:
    problem = webhook_url_problem(channel.target)
    if problem:
        raise DeliveryError(problem)
    body = json.dumps(payload(notification), sort_keys=True).encode()
    request = urllib.request.Request(channel.target, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("User-Agent", "vTPU-Cloud-Alerts/1")
    request.add_header("X-Vtpu-Delivery", str(notification.pk))
    request.add_header("X-Vtpu-Event", notification.event)
    request.add_header(SIGNATURE_HEADER, sign(channel.secret, int(time.time()), body))
    try:
        with urllib.request.urlopen(request, timeout=settings.NOTIFY_TIMEOUT_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"the receiver answered HTTP {exc.code}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"cannot reach the receiver: {reason}") from None


def _send_mail(channel: AlertChannel, notification: Notification) -> None:
    try:
        send_mail(
            subject(notification),
            _mail_body(notification),
            settings.DEFAULT_FROM_EMAIL,
            [channel.target],
        )
    except Exception as exc:  # smtplib and socket raise many kinds
        raise DeliveryError(f"cannot send the mail: {exc}") from None


def _backoff(attempts: int) -> timedelta:
    return timedelta(
        seconds=min(
            settings.NOTIFY_BACKOFF_SECONDS * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS
        )
    )


def notification_deliver(notification_id: int, *, now: datetime | None = None) -> str:
    """One attempt at one notification, if it is due; returns its state afterwards."""
    now = now or timezone.now()
    claimed = Notification.objects.filter(
        pk=notification_id, state="pending", next_attempt_at__lte=now
    ).update(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
    if not claimed:
        row = Notification.objects.filter(pk=notification_id).only("state").first()
        return row.state if row else "missing"
    notification = Notification.objects.select_related("alert__node", "channel").get(
        pk=notification_id
    )
    channel = notification.channel
    started = time.monotonic()
    status, error = None, ""
    try:
        if channel.kind == AlertChannel.Kind.WEBHOOK:
            status = _send_webhook(channel, notification)
        else:
            _send_mail(channel, notification)
    except DeliveryError as exc:
        status, error = exc.status, str(exc)
    except Exception as exc:  # noqa: BLE001 - recorded, retried; never lost
        log.exception("delivering notification %s", notification_id)
        error = f"{exc.__class__.__name__}: {exc}"
    took = round((time.monotonic() - started) * 1000)
    DeliveryAttempt.objects.create(
        notification=notification, ok=not error, status_code=status, error=error, duration_ms=took
    )
    notification.attempts += 1
    if not error:
        notification.state, notification.sent_at, notification.last_error = "sent", now, ""
    else:
        notification.last_error = error
        retry_at = now + _backoff(notification.attempts)
        give_up = notification.created + timedelta(seconds=settings.NOTIFY_RETRY_SECONDS)
        if retry_at > give_up:
            notification.state = "failed"
            log.warning(
                "gave up notification %s after %d attempts: %s",
                notification_id,
                notification.attempts,
                error,
            )
        notification.next_attempt_at = retry_at
    notification.save(
        update_fields=["state", "sent_at", "last_error", "attempts", "next_attempt_at"]
    )
    return notification.state


def notifications_deliver_due(*, now: datetime, limit: int = 200) -> int:
    """Send the notifications whose (next) attempt is due: the sweep behind the per-message
    tasks. Returns how many were sent to the queue."""
    due = Notification.objects.filter(state="pending", next_attempt_at__lte=now).order_by(
        "next_attempt_at"
    )
    ids = list(due.values_list("pk", flat=True)[:limit])
    for pk in ids:
        queue.send_task(DELIVER_TASK, pk)
    return len(ids)
