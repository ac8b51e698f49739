"""Telemetry: every figure measured or null with a reason; RAPL, the power model, Prometheus."""

from __future__ import annotations

import dataclasses
import errno
import re
import threading
import time
from pathlib import Path

import pytest

from vtpu import perf
from vtpu.counters import COUNTERS, PIPES, SLOTS, kernel_scope
from vtpu.cpu import cpu_info
from vtpu.telemetry import Telemetry, format_info, info_report, parse_proc_stat

NO_PMU = not perf.hardware_counters()
no_pmu_only = pytest.mark.skipif(not NO_PMU, reason="this machine has hardware counters")
MAX_RANGE_UJ = 262143328850


class FakeCounters:
    def __init__(self) -> None:
        self.values = dict.fromkeys((n for n in SLOTS if not n.startswith("pipe_")), 0)
        self.pipe_busy_ns = dict.fromkeys(PIPES, 0)
        self.started_at = time.time()

    def snapshot(self) -> dict:
        return {
            **self.values,
            "pipe_busy_ns": dict(self.pipe_busy_ns),
            "started_at": self.started_at,
        }


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


class FakeHardware:
    """Stands in for open hardware counters (this VM has none)."""

    missing: dict[str, str] = {}

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def __bool__(self) -> bool:
        return True

    def read(self) -> dict:
        return {"counts": dict(self.counts), "multiplexed": False}


def write_proc_stat(path: Path, busy: int, idle: int) -> None:
    path.write_text(
        f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy} 0 0 {idle} 0 0 0 0 0 0\nintr 1 2 3\n"
    )


def make_rapl(root: Path, energy_uj: int, max_range_uj: int = MAX_RANGE_UJ) -> Path:
    zone = root / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)  # a sub-zone (cores): must not be added
    (zone / "intel-rapl:0:0" / "energy_uj").write_text("999999999\n")
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    return zone / "energy_uj"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def counters() -> FakeCounters:
    return FakeCounters()


@pytest.fixture
def proc_stat(tmp_path: Path) -> Path:
    path = tmp_path / "stat"
    write_proc_stat(path, busy=100, idle=900)
    return path


def make_telemetry(tmp_path: Path, clock: Clock, counters: FakeCounters, proc_stat: Path, **kw):
    kw.setdefault("powercap_root", tmp_path / "no-powercap")
    kw.setdefault("hardware", perf.Unavailable("no PMU in this test", errno.ENOENT))
    return Telemetry(proc_stat=proc_stat, counters=counters, monotonic_ns=clock, **kw)


# -- this machine: no PMU, no RAPL ----------------------------------------------------------


@no_pmu_only
def test_without_a_pmu_cycles_come_from_cpu_time_and_tsc() -> None:
    snap = Telemetry().snapshot()
    assert "x TSC" in snap["sources"]["cycles"]
    assert "ENOENT" in snap["sources"]["cycles"] or "failed" in snap["sources"]["cycles"]


@no_pmu_only
def test_without_a_pmu_cache_hit_rate_and_ipc_are_null_with_the_reason() -> None:
    snap = Telemetry().snapshot()
    assert snap["cache_hit_rate"] == {"L1": None, "L2": None, "L3": None, "combined": None}
    assert snap["ipc"] is None
    reason = perf.hardware_counters().reason
    assert snap["sources"]["cache_hit_rate"] == f"null: no hardware cache events: {reason}"
    assert snap["sources"]["ipc"].startswith("null: ")
    assert "perf_event_open(PERF_COUNT_HW_CPU_CYCLES) failed" in reason


def test_perf_failures_are_explained_for_people(monkeypatch) -> None:
    assert "no hardware PMU" in perf.explain_errno(errno.ENOENT, "PERF_COUNT_HW_CPU_CYCLES")
    monkeypatch.setattr(perf, "paranoid_level", lambda: 3)
    text = perf.explain_errno(errno.EACCES, "PERF_COUNT_HW_CPU_CYCLES")
    assert text.startswith("perf_event_open(PERF_COUNT_HW_CPU_CYCLES) failed: EACCES")
    assert "perf_event_paranoid=3" in text


def test_an_unavailable_result_is_falsy_and_carries_errno() -> None:
    gone = perf.Unavailable("why", errno.ENOENT)
    assert not gone and gone.errno == errno.ENOENT


def test_counter_fds_count_all_threads_of_the_process() -> None:
    # The hardware path, exercised with the software task-clock event that works in VMs.
    ok, why = perf.task_clock_available()
    if not ok:
        pytest.skip(why)
    stop = threading.Event()
    worker = threading.Thread(target=lambda: stop.wait(5))
    worker.start()
    try:
        fds = perf._open_for_process(perf.PERF_TYPE_SOFTWARE, perf.PERF_COUNT_SW_TASK_CLOCK)
        assert len(fds) >= 2
        counters = perf.HardwareCounters({"task_clock": fds})
        before = counters.read()["counts"]["task_clock"]
        sum(range(200_000))
        after = counters.read()
        assert after["counts"]["task_clock"] > before
        assert after["multiplexed"] is False
        counters.close()
        assert counters.fds == {}
    finally:
        stop.set()
        worker.join()


def test_hardware_counters_give_cache_hit_rates_and_ipc(
    tmp_path, clock, counters, proc_stat
) -> None:
    hw = FakeHardware(
        {
            "cycles": 1000,
            "instructions": 2500,
            "l1d_read_access": 1000,
            "l1d_read_miss": 100,
            "llc_read_access": 50,
            "llc_read_miss": 10,
        }
    )
    snap = make_telemetry(tmp_path, clock, counters, proc_stat, hardware=hw).snapshot()
    assert snap["cache_hit_rate"] == {"L1": 0.9, "L2": None, "L3": 0.8, "combined": 0.99}
    assert snap["ipc"] == 2.5
    assert snap["sources"]["cache_hit_rate"].startswith("perf_event_open hardware cache events")


def test_hardware_cycles_are_preferred_when_the_runtime_counted_them(
    tmp_path, clock, counters, proc_stat
) -> None:
    counters.values.update(ops=6000, runtime_cycles_hw=2000, runtime_cpu_ns=10_000)
    hw = FakeHardware({"cycles": 1, "instructions": 1})
    snap = make_telemetry(tmp_path, clock, counters, proc_stat, hardware=hw).snapshot()
    assert snap["cycles"] == 2000 and snap["ops_per_cycle"] == 3.0
    assert snap["sources"]["cycles"].startswith("perf_event_open hardware counter")


# -- figures from the runtime counters ---------------------------------------------------------


def test_snapshot_figures_follow_real_kernel_work() -> None:
    telemetry = Telemetry()
    before = telemetry.snapshot()
    ops = 2 * 64**3
    for _ in range(3):
        with kernel_scope(ops):
            sum(i * i for i in range(20_000))  # some real CPU time inside the scope
    COUNTERS.add(errors=1, ppt_lookups=4, ppt_hits=3)
    after = telemetry.snapshot()
    assert after["ops"] - before["ops"] == 3 * ops
    assert after["cycles"] > before["cycles"]
    assert after["errors"] == before["errors"] + 1
    assert after["ops_per_cycle"] is not None and after["ops_per_cycle"] > 0
    assert after["throughput_gops"] is not None and after["throughput_gops"] > 0
    assert after["utilization"] is not None and after["utilization"] > 0
    assert after["ppt_hit_rate"] is not None
    assert after["window"]["ops"] >= 3 * ops


def test_figures_are_exact_from_the_counters(tmp_path, clock, counters, proc_stat) -> None:
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat)
    tsc_hz = telemetry.cpu.tsc["hz"]
    counters.values.update(
        ops=4_000_000_000,
        runtime_cpu_ns=1_000_000_000,
        kernel_wall_ns=500_000_000,
        ppt_lookups=10,
        ppt_hits=9,
    )
    counters.pipe_busy_ns["D"] = 1_000_000_000
    clock.advance(2)
    snap = telemetry.snapshot()
    assert snap["cycles"] == pytest.approx(tsc_hz)
    assert snap["ops_per_cycle"] == pytest.approx(4e9 / tsc_hz)
    assert snap["throughput_gops"] == pytest.approx(8.0)
    assert snap["utilization"] == pytest.approx(8e9 / telemetry.cpu.peak["fp32_ops_per_s"])
    assert snap["ppt_hit_rate"] == pytest.approx(0.9)
    assert snap["window_seconds"] == pytest.approx(2.0)
    assert snap["pipe_occupancy"]["D"] == pytest.approx(1 / (2 * telemetry.cpu.logical_cpus))
    assert snap["window"]["average_gops"] == pytest.approx(2.0)


def test_idle_time_does_not_dilute_lifetime_throughput(
    tmp_path, clock, counters, proc_stat
) -> None:
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat)
    counters.values.update(ops=10**9, runtime_cpu_ns=10**8, kernel_wall_ns=10**8)
    clock.advance(1)
    busy = telemetry.snapshot()
    for _ in range(3):  # a long idle time, polled every minute
        clock.advance(61)
        idle = telemetry.snapshot()
    assert idle["throughput_gops"] == busy["throughput_gops"] == pytest.approx(10.0)
    assert idle["ops_per_cycle"] == busy["ops_per_cycle"]
    assert idle["ops"] == 10**9
    assert idle["window"]["ops"] == 0
    assert idle["window"]["throughput_gops"] is None
    assert idle["window_seconds"] == pytest.approx(61.0)


def test_before_any_kernel_ran_ratios_are_null_with_a_reason(
    tmp_path, clock, counters, proc_stat
) -> None:
    snap = make_telemetry(tmp_path, clock, counters, proc_stat).snapshot()
    for figure in ("ops_per_cycle", "throughput_gops", "utilization", "ppt_hit_rate"):
        assert snap[figure] is None
        assert snap["sources"][figure].startswith("null: ")
    assert snap["ops"] == 0


# -- power -----------------------------------------------------------------------------------


def test_power_model_uses_proc_stat_utilisation_and_tdp(tmp_path, clock, counters, proc_stat):
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat, tdp_watts=100.0)
    write_proc_stat(proc_stat, busy=150, idle=950)  # 50 of 100 jiffies busy
    counters.values["ops"] = 1_300_000_000
    clock.advance(2)
    snap = telemetry.snapshot()
    assert snap["window"]["host_cpu_utilization"] == pytest.approx(0.5)
    assert snap["power_watts"] == pytest.approx(30 + 70 * 0.5)  # idle 0.3 x TDP
    assert snap["window"]["energy_joules"] == pytest.approx(130.0)
    assert snap["mops_per_watt"] == pytest.approx(1300 / 130)
    assert snap["lifetime"]["mops_per_watt"] == pytest.approx(10.0)
    assert snap["sources"]["power_watts"].startswith("model: idle + (TDP - idle)")
    assert "no RAPL" in snap["sources"]["power_watts"]
    assert snap["sources"]["mops_per_watt"].startswith("derived")


def test_power_model_honours_configured_idle(tmp_path, clock, counters, proc_stat) -> None:
    telemetry = make_telemetry(
        tmp_path, clock, counters, proc_stat, tdp_watts=200.0, idle_watts=50.0
    )
    write_proc_stat(proc_stat, busy=200, idle=900)  # fully busy
    clock.advance(1)
    assert telemetry.snapshot()["power_watts"] == pytest.approx(200.0)


def test_power_is_null_over_a_too_short_window(tmp_path, clock, counters, proc_stat) -> None:
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat)
    clock.advance(0.01)
    snap = telemetry.snapshot()
    assert snap["power_watts"] is None and snap["mops_per_watt"] is None
    assert "too short" in snap["sources"]["power_watts"]


def test_power_is_null_without_rapl_or_proc_stat(tmp_path, clock, counters) -> None:
    telemetry = make_telemetry(tmp_path, clock, counters, tmp_path / "missing-stat")
    clock.advance(5)
    snap = telemetry.snapshot()
    assert snap["power_watts"] is None
    assert "no RAPL" in snap["sources"]["power_watts"]
    assert "unreadable" in snap["sources"]["power_watts"]


def test_rapl_energy_gives_power(tmp_path, clock, counters, proc_stat) -> None:
    energy = make_rapl(tmp_path / "powercap", energy_uj=1_000_000)
    telemetry = make_telemetry(
        tmp_path, clock, counters, proc_stat, powercap_root=tmp_path / "powercap"
    )
    energy.write_text("101000000\n")  # +100 J
    clock.advance(2)
    snap = telemetry.snapshot()
    assert snap["power_watts"] == pytest.approx(50.0)
    assert snap["sources"]["power_watts"] == "RAPL package energy (intel-rapl:0)"


def test_rapl_counter_wrap_around_is_handled(tmp_path, clock, counters, proc_stat) -> None:
    energy = make_rapl(tmp_path / "powercap", energy_uj=MAX_RANGE_UJ - 20_000_000)
    telemetry = make_telemetry(
        tmp_path, clock, counters, proc_stat, powercap_root=tmp_path / "powercap"
    )
    energy.write_text("30000000\n")  # wrapped: 20 J before the wrap + 30 J after
    clock.advance(1)
    snap = telemetry.snapshot()
    assert snap["power_watts"] == pytest.approx(50.0)
    energy.write_text("130000000\n")
    clock.advance(1)
    snap = telemetry.snapshot()
    assert snap["lifetime"]["energy_joules"] == pytest.approx(150.0)
    assert snap["power_watts"] == pytest.approx(75.0)  # 150 J over the 2 s window


# -- configuration, parsing ---------------------------------------------------------------------


@pytest.mark.parametrize("tdp", [-125.0, 0, float("nan"), float("inf")])
def test_a_bad_tdp_is_rejected_with_a_clear_error(tdp) -> None:
    with pytest.raises(ValueError, match="tdp_watts must be a positive number of watts"):
        Telemetry(tdp_watts=tdp)


def test_idle_above_tdp_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"idle_watts must be between 0 and tdp_watts \(100 W\)"):
        Telemetry(tdp_watts=100, idle_watts=150)


def test_proc_stat_parsing() -> None:
    text = "cpu  10 2 3 100 5 1 1 7 4 0\ncpu0 10 2 3 100 5 1 1 7 4 0\n"
    busy, total = parse_proc_stat(text)
    assert busy == 10 + 2 + 3 + 1 + 1  # guest time is already inside user
    assert total == busy + 100 + 5 + 7  # idle, iowait, steal
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        parse_proc_stat("intr 1 2 3\n")


def test_real_proc_stat_parses() -> None:
    busy, total = parse_proc_stat(Path("/proc/stat").read_text())
    assert 0 <= busy <= total


# -- Prometheus ---------------------------------------------------------------------------------

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*)\})?'
    r" (?P<value>[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|NaN|[-+]Inf))$"
)
HELP = re.compile(r"^# HELP (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) .*$")
TYPE = re.compile(r"^# TYPE (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge)$")
BASE_UNIT_SUFFIXES = (
    "_total",
    "_seconds",
    "_watts",
    "_ratio",
    "_joules",
    "_per_second",
    "_per_cycle",
    "_info",
)


def parse_exposition(text: str) -> dict[str, dict]:
    families: dict[str, dict] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if m := HELP.match(line):
            families.setdefault(m["name"], {"samples": []})["help"] = True
        elif m := TYPE.match(line):
            families.setdefault(m["name"], {"samples": []})["type"] = line.split()[-1]
        else:
            m = SAMPLE.match(line)
            assert m, f"not a valid exposition line: {line!r}"
            assert m["name"] in families, f"sample before HELP/TYPE: {line!r}"
            families[m["name"]]["samples"].append((m["labels"] or "", float(m["value"])))
    return families


def test_prometheus_output_parses_and_uses_base_units(tmp_path, clock, counters, proc_stat):
    counters.values.update(ops=10**9, runtime_cpu_ns=10**8, kernel_wall_ns=10**8, siw_issued=5)
    counters.pipe_busy_ns["S"] = 2_000_000_000
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat)
    write_proc_stat(proc_stat, busy=110, idle=990)
    clock.advance(1)
    families = parse_exposition(telemetry.prometheus_metrics())
    for name, family in families.items():
        assert name.startswith("vtpu_")
        assert name.endswith(BASE_UNIT_SUFFIXES), name
        assert family.get("help") and family.get("type") and family["samples"]
        assert (family["type"] == "counter") == name.endswith("_total")
    assert families["vtpu_ops_total"]["samples"] == [("", 1e9)]
    assert families["vtpu_siw_issued_total"]["samples"] == [("", 5.0)]
    assert ('pipe="S"', 2.0) in families["vtpu_pipe_busy_seconds_total"]["samples"]
    assert families["vtpu_runtime_cpu_seconds_total"]["samples"] == [("", 0.1)]
    for name in ("vtpu_ops_per_cycle", "vtpu_power_watts", "vtpu_utilization_ratio"):
        assert name in families
    assert "vtpu_uptime_seconds" in families and "vtpu_info" in families
    # Not measured here, so not shown.
    assert "vtpu_cache_hit_ratio" not in families
    assert "vtpu_instructions_per_cycle" not in families


def test_prometheus_shows_cache_hit_ratio_when_measured(tmp_path, clock, counters, proc_stat):
    hw = FakeHardware({"cycles": 10, "l1d_read_access": 100, "l1d_read_miss": 5})
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat, hardware=hw)
    families = parse_exposition(telemetry.prometheus_metrics())
    assert families["vtpu_cache_hit_ratio"]["samples"] == [('level="L1"', 0.95)]


def test_prometheus_escapes_label_values(tmp_path, clock, counters, proc_stat) -> None:
    odd = dataclasses.replace(cpu_info(), model_name='Odd "CPU" \\ with\nnewline')
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat, cpu=odd)
    text = telemetry.prometheus_metrics()
    parse_exposition(text)
    assert 'cpu="Odd \\"CPU\\" \\\\ with\\nnewline"' in text


# -- vtpu info ------------------------------------------------------------------------------------


def test_info_report_names_cpu_peak_tsc_and_sources() -> None:
    report = info_report()
    assert report["cpu"]["vendor"] == cpu_info().vendor
    assert report["peak"]["fp32_ops_per_s"] > 0
    for figure in ("cycles", "hardware_counters", "task_clock", "power_watts", "cache_hit_rate"):
        assert report["telemetry_sources"][figure]
    text = format_info(report)
    assert "TSC" in text and "peak fp32" in text and "telemetry sources:" in text
    if NO_PMU:
        assert "ENOENT" in text or "failed" in text


# -- honest sources -------------------------------------------------------------------------------


def test_a_default_tdp_is_labelled_default_and_a_given_one_configured(
    tmp_path, clock, counters, proc_stat
) -> None:
    for tdp, label in ((None, "TDP 125 W default"), (90.0, "TDP 90 W configured")):
        telemetry = make_telemetry(tmp_path, clock, counters, proc_stat, tdp_watts=tdp)
        write_proc_stat(proc_stat, busy=110, idle=990)
        clock.advance(1)
        assert label in telemetry.snapshot()["sources"]["power_watts"]


def test_pipe_occupancy_divides_by_the_real_pool_size(tmp_path, clock, counters, proc_stat):
    telemetry = make_telemetry(tmp_path, clock, counters, proc_stat, sentrons=3)
    counters.pipe_busy_ns["D"] = 1_500_000_000
    clock.advance(1)
    snap = telemetry.snapshot()
    assert snap["pipe_occupancy"]["D"] == pytest.approx(1.5 / 3)
    assert "3 sentrons, the agent's sentron pool" in snap["sources"]["pipe_occupancy"]


def test_the_vector_path_is_the_one_the_kernels_use(tmp_path, clock, counters, proc_stat):
    from vtpu import kernels

    snap = make_telemetry(tmp_path, clock, counters, proc_stat).snapshot()
    assert snap["isa"]["vector_path"] == kernels.isa()
    try:
        kernels.set_isa("generic")
        fresh = make_telemetry(tmp_path, clock, counters, proc_stat)
        assert fresh.snapshot()["isa"]["vector_path"] == "generic"
        assert 'vector_path="generic"' in fresh.prometheus_metrics()
    finally:
        kernels.set_isa()
