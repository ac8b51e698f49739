"""Signals the fleet sends so other apps can follow its work without the fleet's services
importing them (dependencies point one way: monitoring listens, fleet never imports monitoring).

- `action_completed(sender=NodeAction, action=...)`: sent once per action, when a heartbeat
  brings its result and it is recorded for the first time (a result sent again sends nothing).
  It is sent inside the heartbeat's transaction; receivers must not raise (a failing receiver is
  logged, the heartbeat goes on) and must keep their own database errors inside a savepoint.
"""

from django.dispatch import Signal

action_completed = Signal()
