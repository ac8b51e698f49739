"""The node state machine: legal moves are recorded with their cause, illegal ones refused."""

import pytest

from fleet.models import Node, NodeTransition
from fleet.services.errors import Conflict, InvalidTransition
from fleet.services.transitions import node_transition

pytestmark = pytest.mark.django_db


def test_a_legal_transition_is_recorded_with_its_cause(alice_node):
    node_transition(node=alice_node, to_state="provisioning", cause="job 1 started")
    node_transition(node=alice_node, to_state="ready", cause="first heartbeat")
    rows = list(
        NodeTransition.objects.filter(node=alice_node).values_list(
            "from_state", "to_state", "cause"
        )
    )
    assert rows[1:] == [
        ("requested", "provisioning", "job 1 started"),
        ("provisioning", "ready", "first heartbeat"),
    ]
    assert rows[0][:2] == ("", "requested")  # the birth is recorded too
    assert Node.objects.get(pk=alice_node.pk).state == "ready"


@pytest.mark.parametrize(
    "path,illegal",
    [
        ([], "terminated"),
        (["provisioning"], "deprovisioning"),
        (["provisioning", "ready"], "requested"),
    ],
)
def test_an_illegal_transition_is_refused_with_a_reason(alice_node, path, illegal):
    for state in path:
        node_transition(node=alice_node, to_state=state, cause="setup")
    before = NodeTransition.objects.count()
    with pytest.raises(InvalidTransition, match=f"cannot go from .* to {illegal}"):
        node_transition(node=alice_node, to_state=illegal, cause="bad")
    assert NodeTransition.objects.count() == before


def test_a_stale_node_loses_the_claim(alice_node):
    stale = Node.objects.get(pk=alice_node.pk)
    node_transition(node=alice_node, to_state="provisioning", cause="first")
    with pytest.raises(Conflict, match="meanwhile"):
        node_transition(node=stale, to_state="provisioning", cause="second")
    assert NodeTransition.objects.filter(to_state="provisioning").count() == 1


def test_a_transition_needs_a_cause(alice_node):
    with pytest.raises(Exception, match="cause"):
        node_transition(node=alice_node, to_state="provisioning", cause=" ")
