"""`vtpu bench`: workloads checked against a reference and timed against a baseline, in one run.

Each workload (workloads.py) builds its inputs from a fixed seed, runs the numpy reference once,
checks our result against it (an incorrect result is reported, never hidden), then times ours
and the baseline interleaved (A B A B ...) in this process. Shared and virtual machines change
speed every few seconds, so `speedup` is the median of the per-pair ratios baseline/ours, not a
ratio of two medians taken at different moments.

Every figure names its source (`sources`); one that could not be measured is null with the
reason (docs/architecture.md, "The node agent").
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from vtpu import jsonenc
from vtpu.bench.progress import ProgressBar

__all__ = [
    "SIZES",
    "WORKLOADS",
    "Case",
    "UnknownWorkloadError",
    "Workload",
    "format_report",
    "machine_info",
    "main",
    "run_suite",
    "run_workload",
]

SIZES = ("full", "quick", "tiny")  # tiny: for tests, seconds for the whole suite
DEFAULT_REPEATS = {"full": 7, "quick": 3, "tiny": 2}

Progress = Callable[..., None]


class UnknownWorkloadError(ValueError):
    """A workload name that is not registered; the message lists the valid ones."""


@dataclass
class Check:
    """The outcome of comparing our result with the reference."""

    correct: bool
    max_error: float | None
    tolerance: str
    detail: str = ""


@dataclass
class Case:
    """One built workload: what to time, what to compare, and how to count its work.

    `ours` and `baseline` take no arguments and reuse preallocated buffers, so the timed runs
    measure compute rather than allocation. `check(ours_output)` compares with the reference
    the workload computed once at build time.
    """

    ours: Callable[[], Any]
    check: Callable[[Any], Check] | None
    baseline: Callable[[], Any] | None = None
    baseline_name: str | None = None
    ops: int | None = None  # per run of ours, from shapes; None for non-arithmetic work
    peak: str | None = "fp32"  # which peak `utilization` divides by: "fp32", "int8" or None
    bytes_moved: int | None = None  # per run, for GB/s (gather)
    extras: Callable[[dict], dict] | None = None  # workload figures from the timing record
    params: dict = field(default_factory=dict)


class Workload:
    """A named benchmark. Subclasses define `sizes` and `build`, or override `run` entirely."""

    name: str = ""
    description: str = ""
    sizes: dict[str, dict] = {}

    def build(self, **params: Any) -> Case:
        raise NotImplementedError

    def run(self, size: str, repeats: int, tick: Callable[[float], None]) -> dict:
        """The result record of this workload (see run_workload)."""
        params = self.sizes[size]
        case = self.build(**params)
        case.params = dict(params)
        return measure_case(self, case, repeats, tick)


WORKLOADS: dict[str, Workload] = {}


def register(workload: type[Workload]) -> type[Workload]:
    """Class decorator: add one instance of the workload to WORKLOADS under its name."""
    instance = workload()
    if not instance.name or instance.name in WORKLOADS:
        raise ValueError(f"workload name {instance.name!r} is empty or already registered")
    missing = [s for s in SIZES if s not in instance.sizes]
    if missing:
        raise ValueError(f"workload {instance.name!r} has no size(s) {missing}")
    WORKLOADS[instance.name] = instance
    return workload


# ---- what the machine is -----------------------------------------------------------------------


def thread_counts(parser: Any, text: str) -> list[int]:
    """`--threads 1,2` of the comparison commands: positive integers, else the parser's usage
    error (exit 2, what to type)."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        parser.error(f"--threads must be integers separated by commas, not {text!r}")
    if any(t < 1 for t in counts):
        parser.error("--threads must be positive")
    return counts


def machine_info() -> dict:
    """CPU model, ISA, threads, TSC and peak, each with the source cpu_info gives it."""
    info: dict[str, Any] = {}
    try:
        from vtpu.cpu import cpu_info

        cpu = cpu_info()
        info.update(
            cpu_model=cpu.model_name,
            vendor=cpu.vendor,
            logical_cpus=cpu.logical_cpus,
            physical_cores=cpu.physical_cores,
            hypervisor=cpu.hypervisor,
            cpu_best_vector_path=cpu.vector_path,
            features=sorted(k for k, v in cpu.features.items() if v),
            tsc=dict(cpu.tsc),
            peak=dict(cpu.peak),
        )
    except Exception as exc:  # the bench still runs; figures that need these become null
        info.update(cpu_model=None, tsc=None, peak=None, cpu_error=f"vtpu.cpu failed: {exc}")
    try:
        from vtpu import kernels

        info["threads"] = kernels.num_threads()
        info["kernel_isa"] = kernels.isa()
        info["vector_path"] = kernels.isa()  # what the kernels run, not the CPU's widest ISA
        info["blas"] = kernels.blas_library()
    except Exception as exc:
        info.update(threads=None, kernel_isa=None, kernels_error=f"vtpu.kernels failed: {exc}")
    info["numpy"] = np.__version__
    return info


# ---- hardware counters, power -----------------------------------------------------------------


def _hardware_counters() -> tuple[Any, str | None]:
    """(open counters, None) or (None, the reason there are none)."""
    try:
        from vtpu.perf import hardware_counters

        counters = hardware_counters()
    except Exception as exc:
        return None, f"vtpu.perf unavailable: {exc}"
    if not counters:
        return None, f"no hardware counters: {getattr(counters, 'reason', 'unavailable')}"
    return counters, None


@dataclass
class PowerSource:
    """RAPL when readable, else telemetry's model: idle + (TDP - idle) x utilisation."""

    rapl: Any = None
    tdp_watts: float | None = None
    idle_watts: float | None = None
    reason: str = ""

    def read(self) -> Any:
        return self.rapl.read() if self.rapl is not None else None

    def joules(self, before: Any, after: Any) -> float:
        return self.rapl.delta_joules(before, after)


@functools.cache
def power_source() -> PowerSource:
    """Where power comes from on this node, found once (powercap is probed on the filesystem)."""
    try:
        from vtpu import telemetry
    except Exception as exc:
        return PowerSource(reason=f"vtpu.telemetry unavailable ({exc})")
    rapl = telemetry.Rapl("/sys/class/powercap")
    if rapl.available:
        return PowerSource(rapl=rapl)
    tdp = telemetry.DEFAULT_TDP_WATTS
    idle = telemetry.DEFAULT_IDLE_FRACTION * tdp
    return PowerSource(tdp_watts=tdp, idle_watts=idle, reason=rapl.reason)


# ---- timing ------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _num(value: Any) -> float | None:
    """A JSON-safe float: None for None, NaN or infinity."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def time_interleaved(
    ours: Callable[[], Any],
    baseline: Callable[[], Any] | None,
    repeats: int,
    tick: Callable[[float], None],
    *,
    read_hw: Callable[[], dict] | None = None,
    power: PowerSource | None = None,
) -> dict:
    """Run ours and baseline alternately, `repeats` pairs after one warm-up pair.

    Returns per-run wall seconds of each, the process CPU seconds (all threads: OpenMP and BLAS
    workers included) spent in our runs, hardware counter deltas over our runs if open, and
    RAPL joules over our runs when `power` reads RAPL.
    """
    ours()
    if baseline is not None:
        baseline()
    ours_s: list[float] = []
    base_s: list[float] = []
    cpu_ns = 0
    hw_total: dict[str, int] = {}
    joules: float | None = 0.0 if power is not None and power.rapl is not None else None
    for i in range(repeats):
        hw0 = read_hw() if read_hw else None
        e0 = power.read() if joules is not None else None
        c0 = time.process_time_ns()
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        c1 = time.process_time_ns()
        if e0 is not None and joules is not None:
            e1 = power.read()
            joules = joules + power.joules(e0, e1) if e1 is not None else None
        if hw0 is not None and read_hw is not None:
            hw1 = read_hw()
            for key, value in hw1.items():
                hw_total[key] = hw_total.get(key, 0) + value - hw0.get(key, 0)
        ours_s.append(t1 - t0)
        cpu_ns += c1 - c0
        if baseline is not None:
            t0 = time.perf_counter()
            baseline()
            base_s.append(time.perf_counter() - t0)
        tick((i + 1) / repeats)
    return {
        "ours": ours_s,
        "baseline": base_s,
        "cpu_ns": cpu_ns,
        "hw": hw_total,
        "joules": joules,
    }


def _counter_snapshot() -> dict:
    try:
        from vtpu.counters import COUNTERS

        return COUNTERS.snapshot()
    except Exception:
        return {}


def measure_case(workload: Workload, case: Case, repeats: int, tick: Callable) -> dict:
    """Check, time and derive every figure of one built case."""
    result = _skeleton(workload, case.params, repeats)
    output = case.ours()
    if case.check is not None:
        check = case.check(output)
        result.update(
            correct=bool(check.correct),
            max_error=_num(check.max_error),
            tolerance=check.tolerance,
        )
        if check.detail:
            result["check_detail"] = check.detail
    else:
        result["sources"]["correct"] = "not checked: this workload has no numeric reference"
    del output

    hw, hw_reason = _hardware_counters()
    read_hw = (lambda: hw.read()["counts"]) if hw is not None else None
    before = _counter_snapshot()
    timing = time_interleaved(
        case.ours, case.baseline, repeats, tick, read_hw=read_hw, power=power_source()
    )
    after = _counter_snapshot()
    fill_timing(result, case, timing, before, after, hw_reason)
    if case.extras is not None:
        result["extras"].update(case.extras(timing))
    return result


def measure_own_rate(
    workload: Workload,
    params: dict,
    repeats: int,
    run: Callable[[], dict],
    check: Check | None,
    *,
    baseline_name: str | None = None,
    ops: int | None = None,
) -> dict:
    """For workloads that time themselves (PPT lookups, SIW issue, sentron overlap).

    `run()` does the timed measurement and returns its figures; "seconds" among them becomes the
    result's seconds, "speedup" its speedup, the rest go to extras. Process CPU time and wall
    time around it give the power model its utilisation.
    """
    result = _skeleton(workload, params, repeats)
    if check is not None:
        result.update(
            correct=bool(check.correct), max_error=_num(check.max_error), tolerance=check.tolerance
        )
        if check.detail:
            result["check_detail"] = check.detail
    else:
        result["sources"]["correct"] = "not checked: this workload has no numeric reference"
    power = power_source()
    before = _counter_snapshot()
    e0 = power.read()
    c0, t0 = time.process_time_ns(), time.perf_counter()
    figures = run()
    wall, cpu_ns = time.perf_counter() - t0, time.process_time_ns() - c0
    e1 = power.read()
    after = _counter_snapshot()
    timing = {
        "ours": [wall],
        "baseline": [],
        "cpu_ns": cpu_ns,
        "hw": {},
        "joules": power.joules(e0, e1) if e0 is not None and e1 is not None else None,
    }
    hw_reason = _hardware_counters()[1] or "not read by self-timed workloads"
    fill_timing(
        result, Case(ours=run, check=None, ops=None, peak=None), timing, before, after, hw_reason
    )
    if result["ppt_hit_rate"] is not None:
        result["sources"]["ppt_hit_rate"] = (
            "vtpu.counters ppt_hits / ppt_lookups over the measurement (its cold pass included)"
        )
    seconds = figures.pop("seconds", None)
    result["seconds"] = _num(seconds)
    result["sources"]["seconds"] = figures.pop(
        "seconds_source", "the workload's own timing (median of its repeats)"
    )
    if "speedup" in figures:
        result["speedup"] = _num(figures.pop("speedup"))
        result["baseline"] = baseline_name
        result["baseline_seconds"] = _num(figures.pop("baseline_seconds", None))
        result["sources"]["speedup"] = figures.pop("speedup_source", "the workload's own timing")
    result["extras"].update({k: _clean(v) for k, v in figures.items()})
    if ops is not None and seconds:
        _own_rate_ops(result, ops, seconds)
    return result


def _own_rate_ops(result: dict, ops: int, seconds: float) -> None:
    """ops, ops/s and utilization of a self-timed arithmetic workload (e.g. a sentron GEMM)."""
    sources = result["sources"]
    result["ops"] = ops
    result["ops_per_second"] = _num(ops / seconds)
    result["gops"] = _num(ops / seconds / 1e9)
    sources["ops"] = "counted from shapes (a multiply-add is 2)"
    sources["ops_per_second"] = "ops / seconds"
    sources["ops_per_cycle"] = (
        "null: the workload times itself, so the CPU time of its own runs is not separable"
    )
    machine = machine_cache()
    peak = (machine.get("peak") or {}).get("fp32_ops_per_s")
    if peak:
        result["utilization"] = _num(ops / seconds / peak)
        sources["utilization"] = f"achieved / fp32 peak: {machine['peak']['source']}"
    if result["power_watts"]:
        result["mops_per_watt"] = _num(ops / seconds / 1e6 / result["power_watts"])
        sources["mops_per_watt"] = "derived: (ops/s / 1e6) / power_watts"


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN and infinity to None, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return _num(value)
    return value


def _skeleton(workload: Workload, params: dict, repeats: int) -> dict:
    """Every key a result has, so consumers need not guess which ones a workload fills."""
    return {
        "name": workload.name,
        "description": workload.description,
        "params": dict(params),
        "repeats": repeats,
        "ops": None,
        "seconds": None,
        "ops_per_second": None,
        "gops": None,
        "ops_per_cycle": None,
        "utilization": None,
        "cache_hit_rate": None,
        "ppt_hit_rate": None,
        "power_watts": None,
        "mops_per_watt": None,
        "baseline": None,
        "baseline_seconds": None,
        "speedup": None,
        "correct": None,
        "max_error": None,
        "tolerance": None,
        "runtime_counted_ops": None,
        "error": None,
        "extras": {},
        "sources": {},
    }


def fill_timing(
    result: dict,
    case: Case,
    timing: dict,
    before: dict,
    after: dict,
    hw_reason: str | None,
) -> None:
    """Derive seconds, rates, ops/cycle, utilization, cache, PPT and power figures in place."""
    from vtpu.bench import machine_cache

    sources = result["sources"]
    repeats = len(timing["ours"])
    seconds = _median(timing["ours"])
    result["seconds"] = _num(seconds)
    sources["seconds"] = f"wall clock, median of {repeats} runs interleaved with the baseline"
    if case.baseline is not None and timing["baseline"]:
        result["baseline"] = case.baseline_name
        result["baseline_seconds"] = _num(_median(timing["baseline"]))
        ratios = [b / o for o, b in zip(timing["ours"], timing["baseline"], strict=True) if o > 0]
        result["speedup"] = _num(_median(ratios))
        sources["speedup"] = "median of per-pair ratios baseline/ours (>1: ours is faster)"
    if case.bytes_moved is not None and seconds:
        result["extras"]["gb_per_second"] = _num(case.bytes_moved / seconds / 1e9)
        if result["baseline_seconds"]:
            result["extras"]["baseline_gb_per_second"] = _num(
                case.bytes_moved / result["baseline_seconds"] / 1e9
            )

    delta = {k: after[k] - before[k] for k in ("ops", "ppt_lookups", "ppt_hits") if k in after}
    if "ops" in delta and repeats:
        result["runtime_counted_ops"] = delta["ops"] // repeats
        sources["runtime_counted_ops"] = "vtpu.counters ops added by the kernels, per run"
    lookups = delta.get("ppt_lookups", 0)
    if lookups:
        result["ppt_hit_rate"] = _num(delta["ppt_hits"] / lookups)
        sources["ppt_hit_rate"] = "vtpu.counters ppt_hits / ppt_lookups over the timed runs"

    counts = timing.get("hw") or {}
    if hw_reason is None and counts.get("l1d_read_access"):
        rates = {"L1": 1 - counts.get("l1d_read_miss", 0) / counts["l1d_read_access"]}
        if counts.get("llc_read_access"):
            rates["L3"] = 1 - counts.get("llc_read_miss", 0) / counts["llc_read_access"]
        result["cache_hit_rate"] = {k: _num(v) for k, v in rates.items()}
        sources["cache_hit_rate"] = "perf_event_open hardware cache events over our runs"
    else:
        sources["cache_hit_rate"] = f"null: {hw_reason or 'the PMU has no cache read events'}"

    machine = machine_cache()
    ops = case.ops
    result["ops"] = ops
    if ops is None:
        why = "null: this workload's unit is not arithmetic (see extras for its own rate)"
        for key in ("ops", "ops_per_second", "ops_per_cycle", "utilization", "mops_per_watt"):
            sources[key] = why
    else:
        sources["ops"] = "counted from shapes (a multiply-add is 2)"
        ops_per_second = ops / seconds if seconds else None
        result["ops_per_second"] = _num(ops_per_second)
        result["gops"] = _num(ops_per_second / 1e9) if ops_per_second else None
        cycles, cycles_source = None, None
        if counts.get("cycles"):
            cycles, cycles_source = counts["cycles"], "perf_event_open cycles over our runs"
        elif machine.get("tsc") and timing["cpu_ns"]:
            tsc = machine["tsc"]
            cycles = timing["cpu_ns"] * 1e-9 * tsc["hz"]
            cycles_source = (
                f"process CPU time of our runs (all threads) x TSC {tsc['hz'] / 1e9:.3f} GHz "
                f"({tsc['source']})"
            )
        if cycles:
            result["ops_per_cycle"] = _num(ops * repeats / cycles)
            sources["ops_per_cycle"] = cycles_source
        else:
            sources["ops_per_cycle"] = "null: neither cycle counters nor the TSC frequency known"
        peak = (machine.get("peak") or {}).get(f"{case.peak}_ops_per_s") if case.peak else None
        if peak and ops_per_second:
            result["utilization"] = _num(ops_per_second / peak)
            sources["utilization"] = f"achieved / {case.peak} peak: {machine['peak']['source']}"
        else:
            sources["utilization"] = "null: no peak known for this machine"

    watts, power_why = _watts(timing, machine)
    result["power_watts"] = _num(watts)
    sources["power_watts"] = power_why
    if watts and result["ops_per_second"]:
        result["mops_per_watt"] = _num(result["ops_per_second"] / 1e6 / watts)
        sources["mops_per_watt"] = "derived: (ops/s / 1e6) / power_watts"
    elif ops is not None:
        sources["mops_per_watt"] = "null: power not known"


def _watts(timing: dict, machine: dict) -> tuple[float | None, str]:
    """Package power during our runs: RAPL energy / time, else the telemetry power model."""
    power = power_source()
    wall = sum(timing["ours"])
    if not wall:
        return None, "null: no timed runs"
    if timing.get("joules") is not None:
        return timing["joules"] / wall, "RAPL package energy over our runs / their wall time"
    if power.tdp_watts is None:
        return None, f"null: {power.reason}"
    cpus = machine.get("logical_cpus") or os.cpu_count() or 1
    utilisation = min(1.0, timing["cpu_ns"] / 1e9 / (wall * cpus))
    watts = power.idle_watts + (power.tdp_watts - power.idle_watts) * utilisation
    return watts, (
        f"model (vtpu.telemetry defaults): idle {power.idle_watts:g} W + (TDP "
        f"{power.tdp_watts:g} W default - idle) x utilisation of our runs ({utilisation:.0%} = process "
        f"CPU time / wall / {cpus} CPUs); {power.reason}"
    )


_MACHINE: dict | None = None


def machine_cache() -> dict:
    """machine_info(), computed once per process (cpu_info may calibrate the TSC)."""
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = machine_info()
    return _MACHINE


# ---- the suite ---------------------------------------------------------------------------------


def resolve_names(names: list[str] | None) -> list[str]:
    """Registered names in suite order; an unknown name raises with the list of valid ones."""
    if not names:
        return list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise UnknownWorkloadError(
            f"unknown workload(s): {', '.join(unknown)}. Valid names: {', '.join(WORKLOADS)}"
        )
    return list(dict.fromkeys(names))


def run_workload(name: str, *, size: str = "full", repeats: int | None = None, tick=None) -> dict:
    """Run one workload; an exception becomes the result's `error`, never a crash of the suite."""
    workload = WORKLOADS[resolve_names([name])[0]]
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    repeats = repeats or DEFAULT_REPEATS[size]
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    started = time.perf_counter()
    try:
        result = workload.run(size, repeats, tick or (lambda fraction: None))
    except Exception as exc:
        result = _skeleton(workload, workload.sizes.get(size, {}), repeats)
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["size"] = size
    result["wall_seconds"] = _num(time.perf_counter() - started)
    return _clean(result)


def run_suite(
    names: list[str] | None = None,
    *,
    quick: bool = False,
    repeats: int | None = None,
    progress: Progress | None = None,
    size: str | None = None,
) -> dict:
    """Run the named workloads (all by default) and return machine, results and totals.

    `progress(index, total, name, fraction, result=None)` is called as each workload advances
    and once more with its result. `size` overrides `quick` ("tiny" is for tests).
    """
    selected = resolve_names(names)
    size = size or ("quick" if quick else "full")
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    machine = machine_cache()
    results = []
    total = len(selected)
    for index, name in enumerate(selected, start=1):
        if progress:
            progress(index, total, name, 0.0)

        def tick(fraction: float, index: int = index, name: str = name) -> None:
            if progress:
                progress(index, total, name, fraction)

        result = run_workload(name, size=size, repeats=repeats, tick=tick)
        results.append(result)
        if progress:
            progress(index, total, name, 1.0, result)
    return {
        "machine": machine,
        "size": size,
        "results": results,
        "incorrect": [r["name"] for r in results if r["correct"] is False],
        "errors": {r["name"]: r["error"] for r in results if r["error"]},
        # ru_maxrss is KiB on Linux
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "started_at": started_at,
        "seconds": _num(time.perf_counter() - t0),
    }


# ---- the report --------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, scale: float = 1.0, none: str = "-") -> str:
    """format(value * scale, spec), or `none` padded to the spec's width."""
    if value is None:
        width = "".join(itertools.takewhile(str.isdigit, spec))
        return none.rjust(int(width)) if width else none
    return format(value * scale, spec)


def _extra_summary(result: dict) -> str:
    extras = result.get("extras") or {}
    parts = []
    if "lookups_per_second" in extras:
        parts.append(f"{_fmt(extras['lookups_per_second'], '.3g', 1e-6)} M lookups/s")
    if "ns_per_lookup" in extras:
        parts.append(f"{_fmt(extras['ns_per_lookup'], '.1f')} ns/lookup")
    if "miss_rate" in extras:
        parts.append(f"miss {_fmt(extras['miss_rate'], '.2%')}")
    if "gb_per_second" in extras:
        parts.append(f"{_fmt(extras['gb_per_second'], '.2f')} GB/s")
    if "ns_per_siw" in extras:
        parts.append(f"{_fmt(extras['ns_per_siw'], '.0f')} ns/SIW")
    if "overlap_fraction" in extras:
        parts.append(f"overlap {_fmt(extras['overlap_fraction'], '.0%')}")
    if "overlap_speedup" in extras:
        parts.append(f"on/off {_fmt(extras['overlap_speedup'], '.2f')}x")
    return ", ".join(parts)


def format_report(suite: dict) -> str:
    """An aligned table of every workload, then the figures that matter, for people."""
    machine = suite.get("machine") or {}
    lines = []
    tsc = machine.get("tsc") or {}
    peak = machine.get("peak") or {}
    lines.append(
        f"vtpu bench ({suite.get('size')}) on {machine.get('cpu_model')}, "
        f"{machine.get('threads')} threads, kernels {machine.get('kernel_isa')}, "
        f"TSC {_fmt(tsc.get('hz'), '.3f', 1e-9)} GHz"
    )
    if peak:
        lines.append(
            f"peak fp32 {_fmt(peak.get('fp32_ops_per_s'), '.1f', 1e-9)} GFLOP/s, int8 "
            f"{_fmt(peak.get('int8_ops_per_s'), '.1f', 1e-9)} GOP/s ({peak.get('source')})"
        )
    header = (
        f"{'workload':<18} {'ms':>9} {'base ms':>9} {'speedup':>8} {'GOP/s':>8} "
        f"{'ops/cyc':>8} {'util':>6} {'check':>9}  notes"
    )
    lines += ["", header, "-" * len(header)]
    for r in suite.get("results", []):
        if r.get("error"):
            check = "ERROR"
        else:
            check = {True: "ok", False: "INCORRECT", None: "-"}[r.get("correct")]
        notes = r["error"] if r.get("error") else _extra_summary(r)
        if r.get("correct") is False:
            notes = f"max error {_fmt(r.get('max_error'), '.3g')} > {r.get('tolerance')}; " + notes
        lines.append(
            f"{r['name']:<18} {_fmt(r.get('seconds'), '9.3f', 1e3)} "
            f"{_fmt(r.get('baseline_seconds'), '9.3f', 1e3)} "
            f"{_fmt(r.get('speedup'), '7.2f') + ('x' if r.get('speedup') else ''):>8} "
            f"{_fmt(r.get('gops'), '8.2f')} {_fmt(r.get('ops_per_cycle'), '8.2f')} "
            f"{_fmt(r.get('utilization'), '6.1%')} {check:>9}  {notes}"
        )
    by_name = {r["name"]: r for r in suite.get("results", [])}

    def speedup(name: str) -> str:
        r = by_name.get(name)
        if r is None or r.get("speedup") is None:
            return "not run" if r is None else "n/a"
        return f"{r['speedup']:.2f}x vs {r['baseline']}"

    lines += ["", "Figures that matter:"]
    lines.append(f"  GEMM 1024 vs numpy:    {speedup('gemm_1024')}")
    lines.append(f"  MLP block speedup:     {speedup('mlp_block')}")
    lines.append(f"  encoder layer speedup: {speedup('encoder_layer')}")
    for name in ("ppt_structured", "ppt_random"):
        extras = (by_name.get(name) or {}).get("extras") or {}
        if "miss_rate" in extras:
            lines.append(
                f"  {name} miss rate: {_fmt(extras['miss_rate'], '.2%')}, "
                f"{_fmt(extras.get('ns_per_lookup'), '.1f')} ns/lookup"
            )
    ns_siw = ((by_name.get("siw_issue") or {}).get("extras") or {}).get("ns_per_siw")
    if ns_siw is not None:
        lines.append(f"  SIW issue: {ns_siw:.0f} ns per word")
    lines.append(f"  peak memory (RSS): {suite.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")
    lines.append(f"  suite wall time: {_fmt(suite.get('seconds'), '.1f')} s")
    power = next((r["sources"].get("power_watts") for r in suite.get("results", [])), None)
    if power:
        lines.append(f"  power source: {power}")
    cache = next((r["sources"].get("cache_hit_rate") for r in suite.get("results", [])), None)
    if cache:
        lines.append(f"  cache hit rate: {cache}")
    if suite.get("incorrect"):
        lines.append(f"\n!!! INCORRECT RESULTS: {', '.join(suite['incorrect'])} !!!")
    if suite.get("errors"):
        lines.append(f"\n!!! WORKLOADS THAT FAILED: {', '.join(suite['errors'])} !!!")
    return "\n".join(lines)


# ---- the command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtpu bench",
        description="Run the vTPU benchmark suite: each workload is checked against a numpy "
        "reference and timed against a baseline, interleaved, in this process.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 3 repeats (~1 min)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated workload names")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed pairs per workload")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument(
        "--progress", action="store_true", help="draw the progress bar even when not on a TTY"
    )
    parser.add_argument("--size", choices=SIZES, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`vtpu bench`: 0 when all ran and were correct, 1 when one was incorrect or failed, 2 on
    bad arguments."""
    from vtpu.bench import workloads  # noqa: F401  (registers the workloads)

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage and the reason
        return int(exc.code or 0)
    if args.list:
        width = max(len(n) for n in WORKLOADS)
        for name, workload in WORKLOADS.items():
            print(f"{name:<{width}}  {workload.description}")
        return 0
    if args.repeats is not None and args.repeats < 1:
        print(f"vtpu bench: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        names = resolve_names(names)
    except UnknownWorkloadError as exc:
        print(f"vtpu bench: {exc}", file=sys.stderr)
        return 2
    suite = run_suite(
        names,
        quick=args.quick,
        repeats=args.repeats,
        progress=ProgressBar(sys.stderr, force=args.progress),
        size=args.size,
    )
    if args.json:
        print(jsonenc.dumps(suite, indent=2))
    else:
        print(format_report(suite))
    return 1 if suite["incorrect"] or suite["errors"] else 0


# Importing the package registers the workloads, so WORKLOADS is complete for every caller.
from vtpu.bench import workloads as _workloads  # noqa: E402, F401
