"""Moving nodes between states: each move is claimed atomically and recorded once with its cause.

The table of allowed moves is fleet.models.TRANSITIONS. A move is an UPDATE of the row only
while it is still in the state the mover saw (plus any extra condition, e.g. "still silent"), and
its NodeTransition row is written in the same transaction: two actors never both move a node,
and a move that did not happen leaves no row.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from fleet.models import TRANSITIONS, Node, NodeState, NodeTransition
from fleet.services.errors import Conflict, InvalidInput, InvalidTransition
from fleet.signals import node_moved


def claim_transition(
    node: Node, from_state: str, to_state: str, cause: str, *, only_if: Q | None = None
) -> bool:
    """Move `node` from `from_state` to `to_state` if it is still there (and still matches
    `only_if`); record why. False when the row was not in that state any more."""
    if to_state not in TRANSITIONS[from_state]:
        allowed = ", ".join(sorted(TRANSITIONS[from_state])) or "nowhere"
        raise InvalidTransition(
            f"A node cannot go from {from_state} to {to_state}"
            f" (from {from_state} it can go to: {allowed})."
        )
    return _move(node, from_state, to_state, cause, only_if=only_if)


def _move(node: Node, from_state: str, to_state: str, cause: str, *, only_if: Q | None) -> bool:
    with transaction.atomic():
        now = timezone.now()
        rows = Node.objects.filter(pk=node.pk, state=from_state)
        if only_if is not None:
            rows = rows.filter(only_if)
        if rows.update(state=to_state, updated=now) != 1:
            return False
        NodeTransition.objects.create(
            node_id=node.pk, from_state=from_state, to_state=to_state, cause=cause[:2000]
        )
        node.state = to_state
        node_moved.send(sender=Node, node=node, from_state=from_state, to_state=to_state)
    node.state = to_state
    node.updated = now
    return True


@transaction.atomic
def node_transition(*, node: Node, to_state: str, cause: str) -> Node:
    """Move a node to `to_state` from the state the caller saw it in, recording `cause`.

    Raises InvalidTransition for a move the state machine forbids, and Conflict when the node
    changed state meanwhile (someone else acted first; reload and decide again)."""
    seen = node.state
    if not cause.strip():
        raise InvalidInput("A transition needs a cause.", field="cause")
    if not claim_transition(node, seen, to_state, cause):
        current = Node.objects.filter(pk=node.pk).values_list("state", flat=True).first()
        raise Conflict(f"The node changed from {seen} to {current} meanwhile; nothing was done.")
    return node


def try_transition(
    node: Node,
    to_state: str,
    cause: str,
    *,
    from_states: tuple[str, ...] = (),
    only_if: Q | None = None,
) -> bool:
    """The move for sweeps and heartbeats: only from `from_states` (default: the state the node
    was loaded in), silently nothing when another actor got there first."""
    for from_state in from_states or (node.state,):
        if to_state in TRANSITIONS[from_state] and claim_transition(
            node, from_state, to_state, cause, only_if=only_if
        ):
            return True
    return False


def force_terminate(node: Node, cause: str) -> bool:
    """Staff's way out of any state (outside the table): recorded like every other move."""
    current = Node.objects.filter(pk=node.pk).values_list("state", flat=True).first()
    if current is None or current == NodeState.TERMINATED:
        return False
    return _move(node, current, NodeState.TERMINATED, cause, only_if=None)


def record_birth(node: Node, cause: str) -> None:
    NodeTransition.objects.create(node=node, from_state="", to_state=node.state, cause=cause)
