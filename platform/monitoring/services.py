"""Writes of monitoring: closing a month's SLA (exactly one credit per node and month, however
often or concurrently it runs) and staff's maintenance windows."""

from __future__ import annotations

from datetime import date, datetime

from django.conf import settings
from django.db import IntegrityError, transaction

from accounts.models import User
from controlplane.errors import ServiceError
from fleet.models import Host, Node, NodeTransition
from monitoring.models import MaintenanceWindow, SlaCredit, SlaMonthClosed
from monitoring.uptime import month_bounds, node_uptime


class MonitoringError(ServiceError):
    status = 400


def credit_percent(uptime_ratio: float) -> int:
    """The share of the monthly fee owed for a month at `uptime_ratio` (SLA_CREDIT_SCHEDULE:
    (below this ratio, this percent), most severe first)."""
    for below, percent in settings.SLA_CREDIT_SCHEDULE:
        if uptime_ratio < below:
            return percent
    return 0


def sla_month_close(*, month: date, now: datetime) -> int:
    """Record an SLA credit for every node below its target in `month` (which must have ended).
    Returns how many credits this call created; a second or concurrent call creates none."""
    month = month.replace(day=1)
    start, end = month_bounds(month)
    if now < end:
        raise MonitoringError(f"{month:%Y-%m} has not ended yet.", field="month")
    if SlaMonthClosed.objects.filter(month=month).exists():
        return 0
    target = settings.SLA_TARGET
    created = 0
    seen = NodeTransition.objects.filter(created__lt=end).values("node_id").distinct()
    for node in Node.objects.filter(pk__in=seen).select_related("account"):
        uptime = node_uptime(node, start, end)
        ratio = uptime.ratio
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
                    credit_percent=credit_percent(ratio),
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
