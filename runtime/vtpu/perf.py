"""Hardware performance counters through perf_event_open(2), or the reason there are none.

Counters are opened for this process (every thread that exists when they are opened, and with
`inherit` every thread those start later), user space only. Many VMs have no virtual PMU: the
cycles event then fails with ENOENT and telemetry falls back to CPU time x TSC frequency; it
never invents cache hit rates. Each event is its own fd (the kernel refuses group reads of
inherited counters) and reads are scaled by time_enabled / time_running when the PMU multiplexes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

_SYS_PERF_EVENT_OPEN = 298  # x86-64
_PERF_FLAG_FD_CLOEXEC = 1 << 3

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_HW_CACHE = 3
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
PERF_COUNT_SW_TASK_CLOCK = 1
_CACHE_L1D, _CACHE_LL = 0, 2
_OP_READ = 0
_RESULT_ACCESS, _RESULT_MISS = 0, 1
_FORMAT_TOTAL_TIME_ENABLED = 1 << 0
_FORMAT_TOTAL_TIME_RUNNING = 1 << 1
# perf_event_attr flag bits (a 64-bit bitfield after read_format).
_ATTR_INHERIT = 1 << 1
_ATTR_EXCLUDE_KERNEL = 1 << 5
_ATTR_EXCLUDE_HV = 1 << 6


def _cache_config(cache: int, result: int) -> int:
    return cache | (_OP_READ << 8) | (result << 16)


# name -> (type, config, perf's own name for messages)
HARDWARE_EVENTS: dict[str, tuple[int, int, str]] = {
    "cycles": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, "PERF_COUNT_HW_CPU_CYCLES"),
    "instructions": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS, "PERF_COUNT_HW_INSTRUCTIONS"),
    "l1d_read_access": (
        PERF_TYPE_HW_CACHE,
        _cache_config(_CACHE_L1D, _RESULT_ACCESS),
        "L1D read access",
    ),
    "l1d_read_miss": (PERF_TYPE_HW_CACHE, _cache_config(_CACHE_L1D, _RESULT_MISS), "L1D read miss"),
    "llc_read_access": (PERF_TYPE_HW_CACHE, _cache_config(_CACHE_LL, _RESULT_ACCESS), "LLC read"),
    "llc_read_miss": (PERF_TYPE_HW_CACHE, _cache_config(_CACHE_LL, _RESULT_MISS), "LLC read miss"),
}


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER5 (112 bytes); later fields stay zero."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
    ]


assert ctypes.sizeof(PerfEventAttr) == 112

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_READ = struct.Struct("<QQQ")  # value, time_enabled, time_running


def paranoid_level(path: str = "/proc/sys/kernel/perf_event_paranoid") -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def explain_errno(err: int, event: str) -> str:
    """Why perf_event_open(event) failed, for a person reading telemetry sources."""
    name = errno.errorcode.get(err, str(err))
    why = {
        errno.ENOENT: "the kernel has no such event: no hardware PMU (usual in a VM)",
        errno.EOPNOTSUPP: "the PMU does not support this event (or no PMU in this VM)",
        errno.ENODEV: "no PMU for this event on this CPU",
        errno.ENOSYS: "perf_event_open is not available (kernel without perf, or seccomp)",
        errno.EINVAL: "the kernel rejected the event configuration",
        errno.EMFILE: "too many open files",
    }.get(err)
    if err in (errno.EACCES, errno.EPERM):
        level = paranoid_level()
        why = (
            f"not permitted (kernel.perf_event_paranoid={level}; <=2 allows user-space"
            " counting of one's own process, or grant CAP_PERFMON; seccomp can also block it)"
        )
    return f"perf_event_open({event}) failed: {name} — {why or os.strerror(err)}"


def perf_event_open(type_: int, config: int, pid: int = 0, cpu: int = -1) -> int:
    """An fd counting one event for thread `pid` (0: the calling thread), inherited by children.

    Raises OSError with the errno on failure.
    """
    attr = PerfEventAttr()
    attr.type = type_
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = config
    attr.read_format = _FORMAT_TOTAL_TIME_ENABLED | _FORMAT_TOTAL_TIME_RUNNING
    attr.flags = _ATTR_INHERIT | _ATTR_EXCLUDE_KERNEL | _ATTR_EXCLUDE_HV
    fd = _libc.syscall(
        _SYS_PERF_EVENT_OPEN, ctypes.byref(attr), pid, cpu, -1, _PERF_FLAG_FD_CLOEXEC
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _read_scaled(fd: int) -> tuple[int, bool]:
    """(count scaled for multiplexing, whether it was multiplexed)."""
    value, enabled, running = _READ.unpack(os.read(fd, _READ.size))
    if running == 0:
        return 0, enabled > 0
    if running < enabled:
        return round(value * enabled / running), True
    return value, False


@dataclass(frozen=True)
class Unavailable:
    """No hardware counters: `reason` is for people, `errno` for code."""

    reason: str
    errno: int | None = None

    def __bool__(self) -> bool:
        return False


@dataclass
class HardwareCounters:
    """Open hardware event fds for this process; `missing` names events that failed and why."""

    fds: dict[str, list[int]]
    missing: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self) -> dict:
        """{"counts": {event: count}, "multiplexed": bool} summed over this process's threads."""
        counts: dict[str, int] = {}
        multiplexed = False
        with self._lock:
            for name, fds in self.fds.items():
                total = 0
                for fd in fds:
                    value, scaled = _read_scaled(fd)
                    total += value
                    multiplexed |= scaled
                counts[name] = total
        return {"counts": counts, "multiplexed": multiplexed}

    def cycles(self) -> int:
        """Cycles counted so far (unscaled, summed over threads): cheap enough for kernel_scope."""
        return sum(_READ.unpack(os.read(fd, _READ.size))[0] for fd in self.fds["cycles"])

    def close(self) -> None:
        with self._lock:
            for fds in self.fds.values():
                for fd in fds:
                    os.close(fd)
            self.fds = {}


def _thread_ids() -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return [0]


def _open_for_process(type_: int, config: int) -> list[int]:
    """One fd per existing thread of this process; a thread that exits meanwhile is skipped."""
    fds: list[int] = []
    try:
        for tid in _thread_ids():
            try:
                fds.append(perf_event_open(type_, config, pid=tid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def open_hardware_counters(
    events: tuple[str, ...] = tuple(HARDWARE_EVENTS),
) -> HardwareCounters | Unavailable:
    """Open the hardware events for this process; Unavailable(reason) when cycles cannot be.

    Cycles are required (they define the rest); a cache event the PMU lacks is only listed in
    `missing`. Open early, before worker pools start, or rely on inherit for threads to come.
    """
    fds: dict[str, list[int]] = {}
    missing: dict[str, str] = {}
    for name in events:
        type_, config, perf_name = HARDWARE_EVENTS[name]
        try:
            fds[name] = _open_for_process(type_, config)
        except OSError as exc:
            reason = explain_errno(exc.errno or 0, perf_name)
            if name == "cycles":
                for opened in fds.values():
                    for fd in opened:
                        os.close(fd)
                return Unavailable(reason, exc.errno)
            missing[name] = reason
    return HardwareCounters(fds, missing)


@functools.cache
def hardware_counters() -> HardwareCounters | Unavailable:
    """This process's hardware counters, opened once and kept open."""
    return open_hardware_counters()


@functools.cache
def task_clock_available() -> tuple[bool, str]:
    """Whether the software task-clock event works here (it does in VMs without a PMU)."""
    try:
        fd = perf_event_open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK)
    except OSError as exc:
        return False, explain_errno(exc.errno or 0, "PERF_COUNT_SW_TASK_CLOCK")
    try:
        sum(range(10_000))  # some work so the clock is seen to advance
        value, _ = _read_scaled(fd)
    finally:
        os.close(fd)
    return value > 0, f"task-clock software event counts ({value} ns in a probe)"
