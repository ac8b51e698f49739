"""What walks the whole fleet reads it in a constant number of queries (the monitoring benchmark,
`manage.py bench_monitoring`, measures the time at 1,000 nodes); the fleet-wide uptime is the
per-node uptime, to the second."""

from datetime import UTC, date, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fleet.models import Node, NodeTransition
from monitoring.metrics import exposition
from monitoring.models import MaintenanceWindow, SlaCredit
from monitoring.services import sla_month_close
from monitoring.uptime import node_uptime, nodes_uptime
from tests.platform.conftest import account, request_node

pytestmark = pytest.mark.django_db

NOVEMBER = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))


def at(day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def fleet_of(user, count: int) -> list[Node]:
    """Nodes ready since October, node i down for 10 * (i + 1) minutes on 5 November."""
    owner = account(user)
    owner.node_quota = count
    owner.save()
    nodes = []
    for i in range(count):
        node = request_node(user, f"n{i}")
        NodeTransition.objects.filter(node=node).delete()
        moves = [
            (datetime(2026, 10, 1, tzinfo=UTC), "", "ready", "first heartbeat"),
            (at(5, 2), "ready", "degraded", "no heartbeat for 45 s"),
            (at(5, 2) + timedelta(minutes=10 * (i + 1)), "degraded", "ready", "heartbeat again"),
        ]
        for when, from_state, to_state, cause in moves:
            row = NodeTransition.objects.create(
                node=node, from_state=from_state, to_state=to_state, cause=cause
            )
            NodeTransition.objects.filter(pk=row.pk).update(created=when)
        Node.objects.filter(pk=node.pk).update(state="ready")
        nodes.append(Node.objects.get(pk=node.pk))
    return nodes


def roomy(host) -> None:
    host.capacity, host.port_range_end = 50, host.port_range_start + 49
    host.save()


def queries(action) -> int:
    with CaptureQueriesContext(connection) as captured:
        action()
    return len(captured.captured_queries)


def test_fleet_uptime_is_each_nodes_uptime_with_every_kind_of_window(alice, local_host):
    roomy(local_host)
    nodes = fleet_of(alice, 4)
    MaintenanceWindow.objects.create(
        node=nodes[1], starts_at=at(5, 2), ends_at=at(5, 2, 5), reason="node"
    )
    MaintenanceWindow.objects.create(
        host=local_host, starts_at=at(5, 2, 15), ends_at=at(5, 2, 25), reason="host"
    )
    MaintenanceWindow.objects.create(
        starts_at=at(5, 2, 30), ends_at=at(5, 2, 32), reason="the whole fleet"
    )
    Node.objects.filter(pk=nodes[3].pk).update(host=None, kind="enrolled")  # not on the host
    nodes[3].refresh_from_db()
    fleet = nodes_uptime(nodes, *NOVEMBER)
    assert fleet == {node.pk: node_uptime(node, *NOVEMBER) for node in nodes}
    assert fleet[nodes[1].pk].maintenance_seconds == (5 + 5) * 60  # its own and the host's
    assert fleet[nodes[3].pk].maintenance_seconds == 2 * 60  # only the fleet's window
    assert fleet[nodes[3].pk].down_seconds == 40 * 60 - 2 * 60


def test_a_scrape_and_the_month_close_cost_the_same_queries_for_3_or_12_nodes(
    alice, bob, local_host, settings
):
    roomy(local_host)
    fleet_of(alice, 3)
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # no broker: queue lengths left out
    few = queries(exposition)
    fleet_of(bob, 9)
    assert queries(exposition) == few
    now = datetime(2026, 12, 2, tzinfo=UTC)
    closing = queries(lambda: sla_month_close(month=date(2026, 11, 1), now=now))
    # 99.9 % of November allows 43.2 minutes down: bob's nodes down 50 to 90 minutes get a
    # credit each (an INSERT in its own savepoint); reading the fleet costs the same for any size.
    assert SlaCredit.objects.count() == 5
    assert closing - 3 * 5 <= 10, closing  # not 3 per node (36 for these 12)
