"""Uptime from flips, exactly to the second (docs/architecture.md, "Uptime and SLA").

A node's life is the sequence of its transitions. Each stretch of time between two of them is:
- `up`: the node was ready;
- `down`: it was degraded, or failed after it had been serving (ready/degraded → failed);
- `excluded`: it was not yet serving (requested, provisioning, failed before it ever served),
  suspended (by billing for non-payment, or by the account's own choice: not downtime), or deleted (deprovisioning, terminated).
Down time inside a maintenance window (of the node, its host, or the whole fleet) is counted as
`maintenance`, not down. Uptime = up / (up + down); with neither it is None (nothing to judge).
A flip is a change between up and down, with the transition's time and cause.
"""

from __future__ import annotations

import calendar
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.db.models import OuterRef, Q, Subquery

from fleet.models import Node, NodeState, NodeTransition
from monitoring.models import MaintenanceWindow

S = NodeState
SERVING = (S.READY, S.DEGRADED)


@dataclass(frozen=True)
class Uptime:
    start: datetime
    end: datetime
    up_seconds: int
    down_seconds: int
    maintenance_seconds: int
    excluded_seconds: int

    @property
    def ratio(self) -> float | None:
        counted = self.up_seconds + self.down_seconds
        return self.up_seconds / counted if counted else None


@dataclass(frozen=True)
class Flip:
    at: datetime
    up: bool
    cause: str

    @property
    def category(self) -> str:
        return "recovered" if self.up else flip_category(self.cause)


# A flip's cause, as a category (the transition's words say it; these are the words the fleet's
# services write: fleet.services.sweeps, fleet.services.agents, fleet.services.nodes).
FLIP_CATEGORIES = (
    ("no heartbeat", "heartbeat_late"),
    ("health check failed: HTTP 5", "agent_errors"),
    ("health check failed", "health_check_failed"),
    ("(the account's choice)", "suspended_by_account"),
    ("suspend", "suspended_billing"),
    ("maintenance", "maintenance"),
)


def flip_category(cause: str) -> str:
    """heartbeat_late, health_check_failed, agent_errors, suspended_by_account,
    suspended_billing, maintenance, other."""
    lowered = cause.lower()
    for words, category in FLIP_CATEGORIES:
        if lowered.startswith(words.lower()) or words.lower() in lowered:
            return category
    return "other"


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first second of the month, first second of the next), UTC."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    days = calendar.monthrange(month.year, month.month)[1]
    return start, start + timedelta(days=days)


def previous_month(now: datetime) -> date:
    first = date(now.year, now.month, 1)
    return (first - timedelta(days=1)).replace(day=1)


def _kind(transition: NodeTransition) -> str:
    state = transition.to_state
    if state == S.READY:
        return "up"
    if state == S.DEGRADED or (state == S.FAILED and transition.from_state in SERVING):
        return "down"
    return "excluded"


def windows_for(node: Node):
    """The maintenance windows that apply to `node`: its own, its host's, the whole fleet's."""
    scope = Q(node=node) | Q(node__isnull=True, host__isnull=True)
    if node.host_id is not None:
        scope |= Q(host_id=node.host_id)
    return MaintenanceWindow.objects.filter(scope)


def _applies(window: MaintenanceWindow, node: Node) -> bool:
    """Whether a loaded window is one of windows_for(node)."""
    if window.node_id is not None:
        return window.node_id == node.pk
    return window.host_id is None or window.host_id == node.host_id


def _overlap(a: tuple[datetime, datetime], windows: list[tuple[datetime, datetime]]) -> float:
    """Seconds of [a) covered by the union of `windows`."""
    covered, cursor = 0.0, a[0]
    for w_start, w_end in sorted(windows):
        lo, hi = max(w_start, cursor), min(w_end, a[1])
        if hi > lo:
            covered += (hi - lo).total_seconds()
            cursor = hi
    return covered


def _stretches(
    before: NodeTransition | None, during: list[NodeTransition], start: datetime, end: datetime
) -> list[tuple[datetime, datetime, str]]:
    """(from, to, kind) covering [start, end), from the node's last transition before `start`
    and its transitions inside, oldest first."""
    kind = _kind(before) if before else "excluded"
    cursor = start
    out = []
    for t in during:
        if t.created > cursor:
            out.append((cursor, t.created, kind))
        cursor, kind = max(cursor, t.created), _kind(t)
    if end > cursor:
        out.append((cursor, end, kind))
    return out


def _measure(
    stretches: list[tuple[datetime, datetime, str]],
    windows: list[tuple[datetime, datetime]],
    start: datetime,
    end: datetime,
) -> Uptime:
    up = down = maintenance = excluded = 0.0
    for lo, hi, kind in stretches:
        seconds = (hi - lo).total_seconds()
        if kind == "up":
            up += seconds
        elif kind == "down":
            planned = _overlap((lo, hi), windows)
            maintenance += planned
            down += seconds - planned
        else:
            excluded += seconds
    return Uptime(start, end, round(up), round(down), round(maintenance), round(excluded))


def nodes_uptime(nodes: Iterable[Node], start: datetime, end: datetime) -> dict[uuid.UUID, Uptime]:
    """node_uptime of each node, by node id, in three queries however many nodes there are
    (the /metrics scrape and the SLA month close walk the whole fleet)."""
    nodes = list(nodes)
    ids = [node.pk for node in nodes]
    if not ids:
        return {}
    last_before = (
        NodeTransition.objects.filter(node=OuterRef("pk"), created__lt=start)
        .order_by("-created", "-id")
        .values("pk")[:1]
    )
    before_ids = Node.objects.filter(pk__in=ids).annotate(last=Subquery(last_before)).values("last")
    before = {t.node_id: t for t in NodeTransition.objects.filter(pk__in=before_ids)}
    during: dict[uuid.UUID, list[NodeTransition]] = defaultdict(list)
    for t in NodeTransition.objects.filter(
        node_id__in=ids, created__gte=start, created__lt=end
    ).order_by("created", "id"):
        during[t.node_id].append(t)
    windows = list(MaintenanceWindow.objects.filter(starts_at__lt=end, ends_at__gt=start))
    return {
        node.pk: _measure(
            _stretches(before.get(node.pk), during[node.pk], start, end),
            [(max(w.starts_at, start), min(w.ends_at, end)) for w in windows if _applies(w, node)],
            start,
            end,
        )
        for node in nodes
    }


def node_uptime(node: Node, start: datetime, end: datetime) -> Uptime:
    """The node's up, down, maintenance and excluded seconds in [start, end)."""
    return nodes_uptime([node], start, end)[node.pk]


def combined_ratio(values: list[Uptime]) -> float | None:
    """Several nodes (an account's) as one: their up seconds over up + down; None with neither."""
    up = sum(v.up_seconds for v in values)
    counted = up + sum(v.down_seconds for v in values)
    return up / counted if counted else None


def node_uptime_month(node: Node, month: date, *, now: datetime) -> Uptime:
    """A calendar month (UTC), up to `now` while it is running."""
    start, end = month_bounds(month)
    return node_uptime(node, start, min(end, max(now, start)))


def node_uptime_30_days(node: Node, *, now: datetime) -> Uptime:
    return node_uptime(node, now - timedelta(days=30), now)


def nodes_uptime_30_days(nodes: Iterable[Node], *, now: datetime) -> dict[uuid.UUID, Uptime]:
    return nodes_uptime(nodes, now - timedelta(days=30), now)


def node_flips(node: Node, *, since: datetime | None = None) -> list[Flip]:
    """Changes between up and down, oldest first (coming up after a stretch that did not count
    is a flip too; going to an excluded state is not)."""
    flips: list[Flip] = []
    up: bool | None = None
    for t in NodeTransition.objects.filter(node=node).order_by("created", "id"):
        kind = _kind(t)
        if kind == "excluded":
            up = None
            continue
        now_up = kind == "up"
        if now_up != up and (since is None or t.created >= since):
            flips.append(Flip(at=t.created, up=now_up, cause=t.cause))
        up = now_up
    return flips
