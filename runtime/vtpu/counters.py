"""Process-wide runtime counters: the runtime's own record of the work it did.

Kernels add the arithmetic ops they retire (counted from shapes: a multiply-add is 2); sentrons
add words issued and per-pipe busy time; the PPT adds translation-cache lookups and hits.
Telemetry reads a snapshot and turns deltas into rates.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

PIPES = ("D", "S", "C")


@dataclass
class RuntimeCounters:
    ops: int = 0
    kernel_calls: int = 0
    siw_issued: int = 0
    programs_run: int = 0
    errors: int = 0
    ppt_lookups: int = 0
    ppt_hits: int = 0
    pipe_busy_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PIPES, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_ops(self, ops: int) -> None:
        with self._lock:
            self.ops += ops
            self.kernel_calls += 1

    def add_pipe_busy(self, pipe: str, ns: int) -> None:
        with self._lock:
            self.pipe_busy_ns[pipe] += ns

    def add(self, **deltas: int) -> None:
        """Add to any integer counter by name: add(siw_issued=12, programs_run=1)."""
        with self._lock:
            for name, delta in deltas.items():
                if name.startswith("_") or not isinstance(getattr(self, name), int):
                    raise AttributeError(f"no integer counter named {name!r}")
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "ops": self.ops,
                "kernel_calls": self.kernel_calls,
                "siw_issued": self.siw_issued,
                "programs_run": self.programs_run,
                "errors": self.errors,
                "ppt_lookups": self.ppt_lookups,
                "ppt_hits": self.ppt_hits,
                "pipe_busy_ns": dict(self.pipe_busy_ns),
            }


COUNTERS = RuntimeCounters()
