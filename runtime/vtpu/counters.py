"""Runtime counters: the runtime's own record of the work it did, shared node-wide.

Kernels add the arithmetic ops they retire (counted from shapes: a multiply-add is 2) through
`kernel_scope`, which also records the CPU time the process spent while any kernel ran (all
threads, OpenMP and BLAS workers included) and the wall time; sentrons add words issued and
per-pipe busy time; the PPT adds translation-cache lookups and hits. Telemetry turns them into
rates.

By default the counters live in this process. `attach(state_dir)` maps them onto a file in the
node's state directory instead, so every vtpu process on the node (the agent, a `vtpu bench`
run) adds to the same numbers, atomically, and the agent's telemetry shows all of the node's work.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

import numpy as np

from vtpu._counters import Slots, kernel_scope, use_slots

PIPES = ("D", "S", "C")
SLOTS = (
    "ops",
    "kernel_calls",
    "runtime_cpu_ns",
    "kernel_wall_ns",
    "siw_issued",
    "programs_run",
    "errors",
    "ppt_lookups",
    "ppt_hits",
    "runtime_cycles_hw",
    "pipe_busy_ns_D",
    "pipe_busy_ns_S",
    "pipe_busy_ns_C",
)
_INDEX = {name: i for i, name in enumerate(SLOTS)}
# _counters.pyx hard-codes the first four slots for kernel_scope's hot path.
assert SLOTS[:4] == ("ops", "kernel_calls", "runtime_cpu_ns", "kernel_wall_ns")
_N_SLOTS = 64  # room to grow without changing the file format
_MAGIC = b"VTPUCNT1"
_HEADER = struct.Struct("<8sd")  # magic, started_at (unix time)
_DATA_OFFSET = 64


class RuntimeCounters:
    """int64 slots with atomic adds; in memory, or mapped from a node-wide file by attach()."""

    def __init__(self, *, feeds_kernel_scope: bool = False) -> None:
        # Only the process-wide COUNTERS receives kernel_scope's counts; other instances are
        # readers (telemetry of another file, tests).
        self._feeds_kernel_scope = feeds_kernel_scope
        self._slots = Slots(np.zeros(_N_SLOTS, dtype=np.int64))
        if feeds_kernel_scope:
            use_slots(self._slots)
        self.started_at = time.time()
        self.path: Path | None = None
        self._mmap: mmap.mmap | None = None

    def attach(self, path: str | os.PathLike) -> None:
        """Share counters with every vtpu process that attaches the same file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = _DATA_OFFSET + 8 * _N_SLOTS
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)  # one process initialises a new file
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
                os.pwrite(fd, _HEADER.pack(_MAGIC, time.time()), 0)
            magic, started_at = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
            if magic != _MAGIC:
                raise RuntimeError(
                    f"{path} is not a vtpu counters file (bad magic); remove it and restart"
                )
            mapped = mmap.mmap(fd, size)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        view = np.frombuffer(mapped, dtype=np.int64, count=_N_SLOTS, offset=_DATA_OFFSET)
        self._slots = Slots(view)
        if self._feeds_kernel_scope:
            use_slots(self._slots)
        self._mmap = mapped
        self.started_at = started_at
        self.path = path

    def add(self, **deltas: int) -> None:
        """Add to counters by name: add(siw_issued=12, programs_run=1)."""
        for name, delta in deltas.items():
            index = _INDEX.get(name)
            if index is None:
                raise AttributeError(f"no counter named {name!r}; known: {', '.join(SLOTS)}")
            if delta:
                self._slots.add(index, int(delta))

    def add_pipe_busy(self, pipe: str, ns: int) -> None:
        if pipe not in PIPES:
            raise ValueError(f"pipe must be one of {PIPES}, not {pipe!r}")
        self.add(**{f"pipe_busy_ns_{pipe}": ns})

    def snapshot(self) -> dict:
        values = self._slots.load_all()
        snap = {name: values[i] for name, i in _INDEX.items() if not name.startswith("pipe_")}
        snap["pipe_busy_ns"] = {p: values[_INDEX[f"pipe_busy_ns_{p}"]] for p in PIPES}
        snap["started_at"] = self.started_at
        return snap


COUNTERS = RuntimeCounters(feeds_kernel_scope=True)

__all__ = ["COUNTERS", "PIPES", "SLOTS", "RuntimeCounters", "kernel_scope"]
