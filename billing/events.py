"""The registry of Stripe event handlers, by event type.

A handler takes the verified event (a dict, as Stripe sent it) and returns a sentence saying what
it did (stored as the event's outcome); it raises to fail the attempt, which is then retried.
Handlers must not trust the event's snapshot of its object: events arrive late, twice and out of
order, so a handler re-reads the object from Stripe and acts on its current state.

Later slices register theirs the same way (`@handles("invoice.paid", ...)` in their module,
imported by BillingConfig.ready).
"""

from __future__ import annotations

from collections.abc import Callable

Handler = Callable[[dict], str]
NO_HANDLER = "no handler"
_HANDLERS: dict[str, Handler] = {}


def handles(*event_types: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for event_type in event_types:
            known = _HANDLERS.get(event_type)
            if known is not None and known is not handler:
                raise RuntimeError(
                    f"two handlers for Stripe event {event_type}: {known}, {handler}"
                )
            _HANDLERS[event_type] = handler
        return handler

    return register


def handler_for(event_type: str) -> Handler | None:
    return _HANDLERS.get(event_type)


def handled_types() -> list[str]:
    return sorted(_HANDLERS)
