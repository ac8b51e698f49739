"""Telemetry: the node's figures, each with where it came from, or null with why not.

Lifetime figures (ops, cycles, ops_per_cycle, throughput) come from the runtime counters since
they started and are measured over the time the runtime was actually working, so a benchmark run
an hour ago still shows its throughput instead of being diluted to zero by idle time. Power and
efficiency are recent: over a sliding window of the last `window_seconds` (or since the previous
snapshot, when polled less often). The JSON says which is which: top-level figures follow the
seed's shape, `window` and `lifetime` hold both views, and `sources` names every figure's source.

Power is RAPL package energy when the kernel exposes it readably; otherwise a stated model:
idle + (TDP - idle) x host CPU utilisation from /proc/stat, with the TDP configured per node.
"""

from __future__ import annotations

import collections
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtpu import __version__, perf
from vtpu.counters import COUNTERS, PIPES
from vtpu.cpu import CpuInfo, cpu_info

DEFAULT_TDP_WATTS = 125.0  # when none is configured; labelled "default" in sources
DEFAULT_IDLE_FRACTION = 0.3  # idle package power as a share of TDP; typical of server CPUs
MIN_POWER_WINDOW_S = 0.25  # /proc/stat moves in 10 ms ticks: shorter windows are noise
_SAMPLE_EVERY_NS = 1_000_000_000  # keep at most one window sample per second


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat's aggregate "cpu" line.

    Busy is user+nice+system+irq+softirq (guest time is already inside user/nice); idle, iowait
    and steal (time the hypervisor gave to someone else) are not busy.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]] + [0] * (9 - len(fields))
            user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
            busy = user + nice + system + irq + softirq
            return busy, busy + idle + iowait + steal
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


class Rapl:
    """Package energy counters under a powercap root (intel-rapl:N, also used on AMD)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.zones: list[Path] = []
        self.max_range_uj: dict[Path, int] = {}
        self.reason = ""
        if not self.root.is_dir():
            self.reason = f"no RAPL: {self.root} absent"
            return
        zones = sorted(p for p in self.root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
        if not zones:
            self.reason = f"no RAPL package zones (intel-rapl:N) under {self.root}"
            return
        try:
            for zone in zones:
                int((zone / "energy_uj").read_text())
                self.max_range_uj[zone] = int((zone / "max_energy_range_uj").read_text())
        except PermissionError:
            self.reason = (
                f"RAPL present but {zone}/energy_uj is not readable by this user (root-only"
                " since Linux 5.10); run the agent with read access to it"
            )
            return
        except (OSError, ValueError) as exc:
            self.reason = f"RAPL zone {zone} unreadable: {exc}"
            return
        self.zones = zones

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def read(self) -> dict[Path, int] | None:
        try:
            return {zone: int((zone / "energy_uj").read_text()) for zone in self.zones}
        except (OSError, ValueError):
            return None

    def delta_joules(self, before: dict[Path, int], after: dict[Path, int]) -> float:
        """Energy between two reads, summed over packages; a counter that wrapped once is fixed."""
        total_uj = 0
        for zone, end in after.items():
            delta = end - before[zone]
            if delta < 0:
                delta += self.max_range_uj[zone]
            total_uj += delta
        return total_uj / 1e6


@dataclass
class _Sample:
    mono_ns: int
    counters: dict
    host: tuple[int, int] | None  # /proc/stat (busy, total)
    # The energy checkpoint at this sample: time, joules and ops since telemetry start.
    energy_ns: int
    energy_j: float
    energy_ops: int


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


class Telemetry:
    """Figures for /vTPU/telemetry and /metrics; one per agent, safe to call from any thread."""

    def __init__(
        self,
        tdp_watts: float | None = None,
        idle_watts: float | None = None,
        powercap_root: str | os.PathLike = "/sys/class/powercap",
        proc_stat: str | os.PathLike = "/proc/stat",
        *,
        window_seconds: float = 60.0,
        counters=None,
        hardware: perf.HardwareCounters | perf.Unavailable | None = None,
        cpu: CpuInfo | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        sentrons: int | None = None,
        vector_path: str | None = None,
    ) -> None:
        if tdp_watts is None:
            tdp_watts, self._tdp_note = DEFAULT_TDP_WATTS, "default"
        else:
            self._tdp_note = "configured"
        if not (isinstance(tdp_watts, int | float) and math.isfinite(tdp_watts) and tdp_watts > 0):
            raise ValueError(f"tdp_watts must be a positive number of watts, not {tdp_watts!r}")
        if idle_watts is None:
            idle_watts = DEFAULT_IDLE_FRACTION * tdp_watts
            self._idle_note = f"{DEFAULT_IDLE_FRACTION:g} x TDP assumed"
        else:
            self._idle_note = "configured"
        if not (math.isfinite(idle_watts) and 0 <= idle_watts <= tdp_watts):
            raise ValueError(
                f"idle_watts must be between 0 and tdp_watts ({tdp_watts:g} W), not {idle_watts!r}"
            )
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be positive, not {window_seconds!r}")
        self.tdp_watts = float(tdp_watts)
        self.idle_watts = float(idle_watts)
        self.window_seconds = float(window_seconds)
        self.proc_stat = Path(proc_stat)
        self.rapl = Rapl(powercap_root)
        self.counters = counters if counters is not None else COUNTERS
        self.hardware = hardware if hardware is not None else perf.hardware_counters()
        self.cpu = cpu or cpu_info()
        # Occupancy divides by the sentrons that really exist: the agent's pool size. Without
        # a pool (vtpu info, a bench run) one sentron per usable CPU is assumed, and said so.
        if sentrons is None:
            self.sentrons, self._sentrons_note = self.cpu.logical_cpus, "assumed one per usable CPU"
        else:
            self.sentrons, self._sentrons_note = int(sentrons), "the agent's sentron pool"
        self._vector_path = vector_path
        self._now_ns = monotonic_ns
        self._lock = threading.Lock()
        # Energy checkpoint: (time ns, joules, ops, /proc/stat reading, RAPL reading) at the
        # last moment energy was measured; every sample advances it when it can.
        self._checkpoint: tuple | None = None
        first = self._sample()
        self._start = first
        self._samples: collections.deque[_Sample] = collections.deque([first])

    # -- sampling -----------------------------------------------------------------------------

    def _read_host(self) -> tuple[int, int] | None:
        try:
            return parse_proc_stat(self.proc_stat.read_text())
        except (OSError, ValueError):
            return None

    def _sample(self) -> _Sample:
        """Read everything now and advance the energy checkpoint when energy is measurable."""
        now = self._now_ns()
        counters = self.counters.snapshot()
        host = self._read_host()
        if self._checkpoint is None:
            rapl = self.rapl.read() if self.rapl.available else None
            self._checkpoint = (now, 0.0, counters["ops"], host, rapl)
        else:
            energy_ns, energy_j, _, energy_host, rapl = self._checkpoint
            joules = None
            if self.rapl.available:
                reading = self.rapl.read()
                if reading is not None and rapl is not None:
                    joules, rapl = self.rapl.delta_joules(rapl, reading), reading
                elif reading is not None:
                    rapl = reading  # RAPL was unreadable last time: restart from here
                    energy_ns = now
            elif host is not None and energy_host is not None and host[1] > energy_host[1]:
                # Only once /proc/stat has ticked, so no interval's utilisation is 0/0.
                busy, total = host[0] - energy_host[0], host[1] - energy_host[1]
                joules = (now - energy_ns) / 1e9 * self._model_watts(busy / total)
            elif host is not None and energy_host is None:
                energy_host, energy_ns = host, now
            if joules is not None:
                self._checkpoint = (now, energy_j + joules, counters["ops"], host, rapl)
            else:
                self._checkpoint = (energy_ns, energy_j, self._checkpoint[2], energy_host, rapl)
        energy_ns, energy_j, energy_ops = self._checkpoint[:3]
        return _Sample(now, counters, host, energy_ns, energy_j, energy_ops)

    @property
    def vector_path(self) -> str:
        """The vector path the kernels really use (their dispatch), not the CPU's widest ISA."""
        if self._vector_path is None:
            try:
                from vtpu import kernels

                self._vector_path = kernels.isa()
            except ImportError:
                self._vector_path = "unknown (vtpu.kernels not importable)"
        return self._vector_path

    def _model_watts(self, utilisation: float) -> float:
        return self.idle_watts + (self.tdp_watts - self.idle_watts) * utilisation

    def _advance(self) -> tuple[_Sample, _Sample]:
        """Take a sample; return (oldest sample in the window, now)."""
        with self._lock:
            last = self._samples[-1]
            now = self._sample()
            if now.mono_ns - last.mono_ns >= _SAMPLE_EVERY_NS:
                self._samples.append(now)
            horizon = now.mono_ns - int(self.window_seconds * 1e9)
            # Keep the newest sample at or before the horizon as the window's start.
            while len(self._samples) >= 2 and self._samples[1].mono_ns <= horizon:
                self._samples.popleft()
            oldest = self._samples[0]
            if oldest is now:
                oldest = last
            return oldest, now

    # -- figures --------------------------------------------------------------------------------

    def _cycles(self, counters: dict) -> tuple[float, str]:
        hw_cycles = counters.get("runtime_cycles_hw", 0)
        if self.hardware and hw_cycles:
            return float(hw_cycles), "perf_event_open hardware counter (cycles inside kernel calls)"
        tsc = self.cpu.tsc
        source = (
            f"runtime CPU time (all threads, inside kernel calls) x TSC"
            f" ({tsc['hz'] / 1e9:.3f} GHz, {tsc['source']})"
        )
        if not self.hardware:
            source += f"; no hardware cycles: {self.hardware.reason}"
        return counters.get("runtime_cpu_ns", 0) * tsc["hz"] / 1e9, source

    def _hardware_figures(self) -> tuple[dict, float | None, dict[str, str]]:
        """cache_hit_rate, ipc and their sources, from the process's hardware counters."""
        levels = ("L1", "L2", "L3", "combined")
        if not self.hardware:
            why = f"null: no hardware cache events: {self.hardware.reason}"
            ipc_why = f"null: no hardware counters: {self.hardware.reason}"
            return dict.fromkeys(levels), None, {"cache_hit_rate": why, "ipc": ipc_why}
        counts = self.hardware.read()["counts"]

        def hit(miss: str, access: str) -> float | None:
            if miss in counts and access in counts and counts[access]:
                return 1.0 - counts[miss] / counts[access]
            return None

        rates = {
            "L1": hit("l1d_read_miss", "l1d_read_access"),
            "L2": None,  # no generic perf event for L2; needs model-specific raw events
            "L3": hit("llc_read_miss", "llc_read_access"),
            "combined": hit("llc_read_miss", "l1d_read_access"),
        }
        missing = "; ".join(self.hardware.missing.values())
        cache_source = (
            "perf_event_open hardware cache events (whole process, since opened): L1 = L1D"
            " read hits, L3 = LLC read hits, combined = L1D reads not missing the LLC;"
            " L2 null: no generic perf event for L2" + (f"; missing: {missing}" if missing else "")
        )
        ipc = None
        if counts.get("cycles") and "instructions" in counts:
            ipc = counts["instructions"] / counts["cycles"]
        ipc_source = "perf_event_open hardware counters (instructions / cycles, whole process)"
        if ipc is None:
            ipc_source = "null: " + (
                self.hardware.missing.get("instructions") or "no cycles counted yet"
            )
        return rates, ipc, {"cache_hit_rate": cache_source, "ipc": ipc_source}

    def snapshot(self) -> dict:
        """The telemetry JSON (see the module docstring for windows and sources)."""
        oldest, now = self._advance()
        c, c0 = now.counters, oldest.counters
        peak = self.cpu.peak["fp32_ops_per_s"]
        sources: dict[str, str] = {}

        # Lifetime: since the counters started, over the time the runtime was working.
        cycles, sources["cycles"] = self._cycles(c)
        uptime = max(time.time() - c["started_at"], 0.0)
        kernel_s = c.get("kernel_wall_ns", 0) / 1e9
        lifetime = {
            "seconds": uptime,
            "ops": c["ops"],
            "cycles": cycles,
            "kernel_seconds": kernel_s,
            "ops_per_cycle": _ratio(c["ops"], cycles),
            "throughput_gops": _ratio(c["ops"] / 1e9, kernel_s),
            "average_gops": _ratio(c["ops"] / 1e9, uptime),
        }
        lifetime["utilization"] = (
            lifetime["throughput_gops"] * 1e9 / peak if lifetime["throughput_gops"] else None
        )

        # Window: the last window_seconds (or since the previous snapshot).
        window_s = (now.mono_ns - oldest.mono_ns) / 1e9
        w_ops = c["ops"] - c0["ops"]
        w_cycles = cycles - self._cycles(c0)[0]
        w_kernel_s = (c.get("kernel_wall_ns", 0) - c0.get("kernel_wall_ns", 0)) / 1e9
        host_util = None
        if now.host and oldest.host and now.host[1] > oldest.host[1]:
            host_util = (now.host[0] - oldest.host[0]) / (now.host[1] - oldest.host[1])
        energy_s = (now.energy_ns - oldest.energy_ns) / 1e9
        energy_j = now.energy_j - oldest.energy_j
        power = energy_j / energy_s if energy_s >= MIN_POWER_WINDOW_S else None
        w_ops_energy = now.energy_ops - oldest.energy_ops
        window = {
            "seconds": window_s,
            "ops": w_ops,
            "cycles": w_cycles,
            "kernel_seconds": w_kernel_s,
            "ops_per_cycle": _ratio(w_ops, w_cycles),
            "throughput_gops": _ratio(w_ops / 1e9, w_kernel_s),
            "average_gops": _ratio(w_ops / 1e9, window_s),
            "host_cpu_utilization": host_util,
            "power_watts": power,
            "energy_joules": energy_j if energy_s >= MIN_POWER_WINDOW_S else None,
            "mops_per_watt": (w_ops_energy / 1e6 / energy_j) if power and energy_j else None,
            "pipe_occupancy": {
                p: _ratio(
                    c["pipe_busy_ns"][p] - c0["pipe_busy_ns"][p],
                    (now.mono_ns - oldest.mono_ns) * self.sentrons,
                )
                for p in PIPES
            },
        }
        since_start_j = now.energy_j
        lifetime["energy_joules"] = since_start_j if now.energy_ns > self._start.energy_ns else None
        lifetime["mops_per_watt"] = (
            (now.energy_ops - self._start.energy_ops) / 1e6 / since_start_j
            if lifetime["energy_joules"]
            else None
        )
        lifetime["pipe_occupancy"] = {
            p: _ratio(c["pipe_busy_ns"][p] / 1e9, uptime * self.sentrons) for p in PIPES
        }

        cache, ipc, hw_sources = self._hardware_figures()
        sources.update(hw_sources)
        sources.update(self._sources(c, lifetime, window, energy_s))
        return {
            # The seed's figures.
            "ops_per_cycle": lifetime["ops_per_cycle"],
            "cache_hit_rate": cache,
            "throughput_gops": lifetime["throughput_gops"],
            "power_watts": power,
            "mops_per_watt": window["mops_per_watt"],
            "uptime_seconds": uptime,
            "errors": c["errors"],
            # More figures.
            "ops": c["ops"],
            "cycles": cycles,
            "ipc": ipc,
            "average_gops": lifetime["average_gops"],
            "utilization": lifetime["utilization"],
            "peak_gops": {
                "fp32": peak / 1e9,
                "int8": self.cpu.peak["int8_ops_per_s"] / 1e9,
            },
            "ppt_hit_rate": _ratio(c["ppt_hits"], c["ppt_lookups"]),
            "pipe_occupancy": window["pipe_occupancy"],
            "window_seconds": window_s,
            "window": window,
            "lifetime": lifetime,
            "isa": {
                "vector_path": self.vector_path,
                "cpu_best_vector_path": self.cpu.vector_path,
                "features": sorted(k for k, v in self.cpu.features.items() if v),
            },
            "sources": sources,
        }

    def _sources(self, c: dict, lifetime: dict, window: dict, energy_s: float) -> dict[str, str]:
        no_kernels = "null: no kernel has run since the counters started"
        if self.rapl.available:
            power = "RAPL package energy (" + ", ".join(z.name for z in self.rapl.zones) + ")"
        elif self.proc_stat.exists():
            power = (
                f"model: idle + (TDP - idle) x host CPU utilisation from /proc/stat"
                f" (TDP {self.tdp_watts:g} W {self._tdp_note}, idle {self.idle_watts:g} W"
                f" {self._idle_note}); {self.rapl.reason}"
            )
        else:
            power = f"null: {self.rapl.reason}, and {self.proc_stat} is unreadable for the model"
        if window["power_watts"] is None and not power.startswith("null"):
            power = (
                f"null: window of {energy_s:.2f} s is too short to measure power"
                f" (need {MIN_POWER_WINDOW_S} s); poll again. Source when measured: {power}"
            )
        return {
            "ops": "runtime counter (ops from kernel shapes, a multiply-add is 2)",
            "ops_per_cycle": (
                "derived: lifetime ops / runtime cycles"
                if lifetime["ops_per_cycle"] is not None
                else no_kernels
            ),
            "throughput_gops": (
                "derived: lifetime ops / wall time while kernels ran"
                if lifetime["throughput_gops"] is not None
                else no_kernels
            ),
            "average_gops": "derived: lifetime ops / uptime",
            "utilization": (
                "derived: throughput while running / peak fp32 ops/s; peak is "
                + self.cpu.peak["source"]
                if lifetime["utilization"] is not None
                else no_kernels
            ),
            "power_watts": power,
            "mops_per_watt": (
                "derived: (ops/s / 1e6) / W over the window"
                if window["mops_per_watt"] is not None
                else "null: " + ("no power figure" if window["power_watts"] is None else "0 J")
            ),
            "ppt_hit_rate": (
                "runtime counter (PPT translation-cache hits / lookups)"
                if c["ppt_lookups"]
                else "null: no PPT lookups yet"
            ),
            "pipe_occupancy": (
                f"runtime counter: busy time of each sentron pipe / (window x"
                f" {self.sentrons} sentrons, {self._sentrons_note})"
            ),
            "uptime_seconds": "seconds since the runtime counters started",
            "errors": "runtime counter",
            "window": (
                f"the last {self.window_seconds:g} s, or since the previous snapshot when that"
                " was longer ago"
            ),
            "lifetime": "since the runtime counters started (energy: since telemetry started)",
        }

    # -- Prometheus -----------------------------------------------------------------------------

    def prometheus_metrics(self) -> str:
        """Prometheus text exposition (version 0.0.4) of the counters and measured gauges."""
        from vtpu.metrics import exposition

        return exposition(self)


def _kernel_dispatch() -> dict | str:
    """Which kernel paths the runtime picked, or why that cannot be said."""
    try:
        from vtpu import kernels
    except ImportError as exc:
        return f"vtpu.kernels not importable: {exc}"
    return kernels.dispatch_info()


def info_report(telemetry: Telemetry | None = None) -> dict:
    """What `vtpu info` prints: the CPU, its ISA, peak ops/s, TSC, and each figure's source."""
    telemetry = telemetry or Telemetry()
    cpu = telemetry.cpu
    hw = telemetry.hardware
    task_clock_ok, task_clock = perf.task_clock_available()
    snap = telemetry.snapshot()
    return {
        "version": __version__,
        "cpu": {
            "vendor": cpu.vendor,
            "model_name": cpu.model_name,
            "family": cpu.family,
            "model": cpu.model,
            "stepping": cpu.stepping,
            "logical_cpus": cpu.logical_cpus,
            "physical_cores": cpu.physical_cores,
            "hypervisor": cpu.hypervisor,
            "caches": cpu.caches,
        },
        "isa": {
            "features": cpu.features,
            "notes": cpu.feature_notes,
            "vector_path": telemetry.vector_path,
            "cpu_best_vector_path": cpu.vector_path,
        },
        "kernels": _kernel_dispatch(),
        "peak": cpu.peak,
        "tsc": cpu.tsc,
        "telemetry_sources": {
            "cycles": snap["sources"]["cycles"],
            "hardware_counters": (
                "perf_event_open hardware counters open"
                + (f" (missing: {'; '.join(hw.missing.values())})" if hw.missing else "")
                if hw
                else hw.reason
            ),
            "task_clock": task_clock if task_clock_ok else f"unavailable: {task_clock}",
            "cache_hit_rate": snap["sources"]["cache_hit_rate"],
            "ipc": snap["sources"]["ipc"],
            "power_watts": (
                "RAPL package energy"
                if telemetry.rapl.available
                else f"model from TDP and /proc/stat utilisation ({telemetry.rapl.reason})"
            ),
            "utilization": "peak " + cpu.peak["source"],
        },
    }


def format_info(report: dict) -> str:
    """The info report as aligned text for a terminal."""
    cpu, isa, peak, tsc = report["cpu"], report["isa"], report["peak"], report["tsc"]
    caches = ", ".join(
        f"{name} {c['bytes'] // 1024} KiB" for name, c in sorted(cpu["caches"].items())
    )
    cores = cpu["physical_cores"] if cpu["physical_cores"] is not None else "unknown"
    lines = [
        f"vTPU runtime {report['version']}",
        f"CPU           {cpu['model_name']} ({cpu['vendor']}, family {cpu['family']}"
        f" model {cpu['model']} stepping {cpu['stepping']}"
        + (", virtual machine)" if cpu["hypervisor"] else ")"),
        f"CPUs          {cpu['logical_cpus']} usable logical CPUs, {cores} physical cores",
        f"caches        {caches or 'unknown'}",
        "ISA           "
        + " ".join(f"{name}{'+' if ok else '-'}" for name, ok in isa["features"].items()),
        f"vector path   {isa['vector_path']} (kernels' dispatch; the CPU's widest:"
        f" {isa['cpu_best_vector_path']})",
    ]
    for name, note in isa["notes"].items():
        lines.append(f"  {name}: {note}")
    kernels = report["kernels"]
    if isinstance(kernels, dict):
        lines.append("kernels       " + ", ".join(f"{k}: {v}" for k, v in kernels.items()))
    else:
        lines.append(f"kernels       {kernels}")
    lines += [
        f"TSC           {tsc['hz'] / 1e9:.3f} GHz ({tsc['source']})",
        f"peak fp32     {peak['fp32_ops_per_s'] / 1e9:,.1f} Gops/s",
        f"peak int8     {peak['int8_ops_per_s'] / 1e9:,.1f} Gops/s",
        f"  {peak['source']}",
        "telemetry sources:",
    ]
    lines += [f"  {name:<18}{text}" for name, text in report["telemetry_sources"].items()]
    return "\n".join(lines)
