"""Running one call from several threads at once, for tests of "exactly once" under concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def at_once(call: Callable[[], Any], times: int, *, timeout: float = 60) -> tuple[list, list]:
    """`call()` from `times` threads released together; (results, exceptions). Each thread
    closes its own database connection (Django opens one per thread)."""
    from django.db import connection

    start = threading.Barrier(times)
    results: list = []
    errors: list = []

    def run() -> None:
        try:
            start.wait(10)
            results.append(call())
        except Exception as exc:  # reported to the caller
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results, errors
