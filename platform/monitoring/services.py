"""Writes of monitoring: closing a month's SLA (exactly one credit per node and month, however
often or concurrently it runs) and staff's maintenance windows."""

from __future__ import annotations

import secrets
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction

from accounts.models import Account, User
from controlplane.errors import ServiceError
from fleet.models import Host, Node, NodeTransition
from monitoring.models import AlertChannel, MaintenanceWindow, SlaCredit, SlaMonthClosed
from monitoring.uptime import month_bounds, nodes_uptime


class MonitoringError(ServiceError):
    status = 400


def sla_terms(node: Node) -> tuple[float, int]:
    """The node's SLA: (monthly uptime target, percent of the fee credited below it), from its
    billing plan, else SLA_TARGET and SLA_CREDIT_PERCENT."""
    if node.plan_id is not None:
        return node.plan.sla_target, node.plan.sla_credit_percent
    return settings.SLA_TARGET, settings.SLA_CREDIT_PERCENT


def credit_percent(
    uptime_ratio: float, *, target: float | None = None, percent: int | None = None
) -> int:
    """The share of the monthly fee owed for a month at `uptime_ratio`: none at or above the
    target, `percent` below it, and at least the SLA_CREDIT_SCHEDULE's share of a deeper breach
    ((below this ratio, this percent), most severe first)."""
    target = settings.SLA_TARGET if target is None else target
    percent = settings.SLA_CREDIT_PERCENT if percent is None else percent
    if uptime_ratio >= target:
        return 0
    for below, deeper in settings.SLA_CREDIT_SCHEDULE:
        if uptime_ratio < below:
            return max(deeper, percent)
    return percent


def sla_month_close(*, month: date, now: datetime) -> int:
    """Record an SLA credit for every node below its target in `month` (which must have ended).
    Returns how many credits this call created; a second or concurrent call creates none."""
    month = month.replace(day=1)
    start, end = month_bounds(month)
    if now < end:
        raise MonitoringError(f"{month:%Y-%m} has not ended yet.", field="month")
    if SlaMonthClosed.objects.filter(month=month).exists():
        return 0
    created = 0
    seen = NodeTransition.objects.filter(created__lt=end).values("node_id").distinct()
    nodes = list(Node.objects.filter(pk__in=seen).select_related("account", "plan"))
    uptimes = nodes_uptime(nodes, start, end)  # three queries for the whole fleet
    for node in nodes:
        uptime = uptimes[node.pk]
        ratio = uptime.ratio
        target, percent = sla_terms(node)
        if ratio is None or ratio >= target:
            continue
        try:
            with transaction.atomic():
                SlaCredit.objects.create(
                    node=node,
                    account=node.account,
                    month=month,
                    uptime_ratio=ratio,
                    sla_target=target,
                    down_seconds=uptime.down_seconds,
                    credit_percent=credit_percent(ratio, target=target, percent=percent),
                )
        except IntegrityError:
            continue  # another run recorded it first
        created += 1
    SlaMonthClosed.objects.get_or_create(month=month, defaults={"credits": created})
    return created


@transaction.atomic
def maintenance_schedule(
    *,
    starts_at: datetime,
    ends_at: datetime,
    reason: str,
    by: User,
    node: Node | None = None,
    host: Host | None = None,
) -> MaintenanceWindow:
    if ends_at <= starts_at:
        raise MonitoringError("A maintenance window ends after it starts.", field="ends_at")
    if node is not None and host is not None:
        raise MonitoringError("A window is for a node, a host, or the whole fleet.", field="host")
    if not (reason or "").strip():
        raise MonitoringError("Say why: customers read it.", field="reason")
    return MaintenanceWindow.objects.create(
        node=node, host=host, starts_at=starts_at, ends_at=ends_at, reason=reason.strip(),
        created_by=by,
    )  # fmt: skip


# ---- alert channels ---------------------------------------------------------------------------

MAX_CHANNELS_PER_ACCOUNT = 20


def _channel_target_problem(kind: str, target: str) -> str | None:
    from django.core.exceptions import ValidationError
    from django.core.validators import validate_email

    from monitoring.notify import webhook_url_problem

    if kind == AlertChannel.Kind.EMAIL:
        try:
            validate_email(target)
        except ValidationError:
            return f"{target!r} is not an e-mail address."
        return None
    return webhook_url_problem(target)


def channel_create(*, account: Account, kind: str, name: str, target: str) -> AlertChannel:
    """A customer's channel for their own nodes' alerts. A webhook gets a fresh signing secret
    (readable by the account, to verify signatures with)."""
    if kind not in AlertChannel.Kind.values:
        raise MonitoringError(f"kind must be one of {AlertChannel.Kind.values}.", field="kind")
    problem = _channel_target_problem(kind, target)
    if problem:
        raise MonitoringError(problem, field="target")
    if AlertChannel.objects.filter(account=account).count() >= MAX_CHANNELS_PER_ACCOUNT:
        raise MonitoringError(
            f"An account has at most {MAX_CHANNELS_PER_ACCOUNT} channels; delete one first."
        )
    secret = secrets.token_urlsafe(32) if kind == AlertChannel.Kind.WEBHOOK else ""
    return AlertChannel.objects.create(
        account=account, kind=kind, name=name, target=target, secret=secret
    )


def channel_update(
    *,
    channel: AlertChannel,
    name: str | None,
    target: str | None,
    enabled: bool | None,
    rotate_secret: bool = False,
) -> AlertChannel:
    if target is not None:
        problem = _channel_target_problem(channel.kind, target)
        if problem:
            raise MonitoringError(problem, field="target")
        channel.target = target
    if name is not None:
        channel.name = name
    if enabled is not None:
        channel.enabled = enabled
    if rotate_secret:
        if channel.kind != AlertChannel.Kind.WEBHOOK:
            raise MonitoringError("Only a webhook has a signing secret.", field="rotate_secret")
        channel.secret = secrets.token_urlsafe(32)
    channel.save()
    return channel


def history_prune(*, now: datetime) -> dict[str, int]:
    """Benchmark runs (their results with them) past BENCHMARK_RETENTION_DAYS; alerts, their
    messages and SLA records are kept."""
    from monitoring.models import BenchmarkRun

    cutoff = now - timedelta(days=settings.BENCHMARK_RETENTION_DAYS)
    deleted, by_model = BenchmarkRun.objects.filter(created__lt=cutoff).delete()
    return {
        "benchmark_runs": by_model.get("monitoring.BenchmarkRun", 0),
        "benchmark_results": by_model.get("monitoring.BenchmarkResult", 0),
    }
