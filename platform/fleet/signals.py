"""Signals the fleet sends so other apps can follow its work without the fleet's services
importing them (dependencies point one way: monitoring listens, fleet never imports monitoring).

- `action_completed(sender=NodeAction, action=...)`: sent once per action, when a heartbeat
  brings its result and it is recorded for the first time (a result sent again sends nothing).
  It is sent inside the heartbeat's transaction; receivers must not raise (a failing receiver is
  logged, the heartbeat goes on) and must keep their own database errors inside a savepoint.
- `node_moved(sender=Node, node=..., from_state=..., to_state=...)`: sent for every recorded
  state change, inside the transaction that records it (billing shrinks a subscription when a
  node goes). Receivers defer their work to transaction.on_commit and must not raise.
"""

from django.dispatch import Signal

action_completed = Signal()
node_moved = Signal()
