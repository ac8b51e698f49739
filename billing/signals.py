"""Billing follows the fleet through its signals (fleet never imports billing): a node that
starts going away cancels its unpaid charge and shrinks its plan's subscription."""

from fleet.models import Node, NodeState

GONE = (NodeState.DEPROVISIONING, NodeState.TERMINATED)


def _node_moved(sender, *, node: Node, from_state: str, to_state: str, **kwargs) -> None:
    if to_state in GONE and from_state not in GONE:
        from billing.subscriptions import node_gone

        node_gone(node=node)


def connect() -> None:
    from fleet.signals import node_moved

    node_moved.connect(_node_moved, sender=Node, dispatch_uid="billing.node_moved")
