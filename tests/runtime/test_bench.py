"""vtpu.bench: results are checked, structured and reported; wrong answers are never hidden.

Everything runs at the "tiny" size with one or two repeats: these tests are about behaviour,
not speed (timings on a shared machine mean nothing here).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from vtpu import bench
from vtpu.bench import workloads
from vtpu.bench.progress import ProgressBar

RESULT_KEYS = {
    "name",
    "description",
    "ops",
    "seconds",
    "ops_per_second",
    "gops",
    "ops_per_cycle",
    "utilization",
    "cache_hit_rate",
    "ppt_hit_rate",
    "power_watts",
    "mops_per_watt",
    "baseline",
    "baseline_seconds",
    "speedup",
    "correct",
    "max_error",
    "extras",
    "sources",
    "error",
}


@pytest.fixture(scope="module")
def tiny_suite() -> dict:
    return bench.run_suite(size="tiny", repeats=1)


class _Broken(bench.Workload):
    """A GEMM whose answer is off by one in one element."""

    name = "broken_gemm"
    description = "a deliberately wrong GEMM"
    sizes = {s: {"n": 8} for s in bench.SIZES}

    def build(self, n: int) -> bench.Case:
        a = np.ones((n, n), np.float32)

        def wrong() -> np.ndarray:
            c = a @ a
            c[0, 0] += 1
            return c

        return bench.Case(
            ours=wrong,
            baseline=lambda: a @ a,
            baseline_name="numpy",
            check=workloads.close_to(a @ a, rtol=1e-5, atol_rel=1e-6),
            ops=2 * n**3,
        )


class _Crashing(bench.Workload):
    name = "crashing"
    description = "raises while building"
    sizes = {s: {} for s in bench.SIZES}

    def build(self) -> bench.Case:
        raise RuntimeError("the kernel is not there")


@pytest.fixture
def with_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = dict(bench.WORKLOADS)
    fakes["broken_gemm"] = _Broken()
    fakes["crashing"] = _Crashing()
    monkeypatch.setattr(bench, "WORKLOADS", fakes)


def test_the_suite_registers_at_least_twelve_workloads_with_every_size() -> None:
    assert len(bench.WORKLOADS) >= 12
    for name in ("gemm_1024", "encoder_layer", "ppt_random", "siw_issue", "sentron_gemm"):
        assert name in bench.WORKLOADS
    for workload in bench.WORKLOADS.values():
        assert set(bench.SIZES) <= set(workload.sizes), workload.name
        assert workload.description


def test_every_workload_runs_and_matches_its_reference(tiny_suite: dict) -> None:
    assert tiny_suite["errors"] == {}
    assert tiny_suite["incorrect"] == []
    for result in tiny_suite["results"]:
        assert RESULT_KEYS <= set(result), result["name"]
        assert result["correct"] is True, (result["name"], result.get("check_detail"))
        assert result["seconds"] is not None and result["seconds"] > 0, result["name"]


def test_arithmetic_workloads_report_rates_and_their_sources(tiny_suite: dict) -> None:
    gemm = next(r for r in tiny_suite["results"] if r["name"] == "gemm_256")
    n = gemm["params"]["n"]
    assert gemm["ops"] == 2 * n**3
    assert gemm["baseline"] and gemm["speedup"] > 0 and gemm["baseline_seconds"] > 0
    assert gemm["ops_per_cycle"] > 0 and gemm["utilization"] > 0
    for figure in ("ops_per_cycle", "utilization", "power_watts", "cache_hit_rate", "speedup"):
        assert gemm["sources"][figure], figure
    if gemm["cache_hit_rate"] is None:
        assert gemm["sources"]["cache_hit_rate"].startswith("null:")


def test_lookup_workloads_report_their_own_rate_and_do_not_pad_ops(tiny_suite: dict) -> None:
    for name in ("ppt_structured", "ppt_random", "gather"):
        result = next(r for r in tiny_suite["results"] if r["name"] == name)
        assert result["ops"] is None and result["ops_per_second"] is None
        assert result["sources"]["ops"].startswith("null:")
    ppt = next(r for r in tiny_suite["results"] if r["name"] == "ppt_random")
    assert ppt["extras"]["ns_per_lookup"] > 0 and 0 <= ppt["extras"]["miss_rate"] <= 1
    assert ppt["ppt_hit_rate"] is not None
    gather = next(r for r in tiny_suite["results"] if r["name"] == "gather")
    assert gather["extras"]["gb_per_second"] > 0


def test_the_suite_records_machine_memory_and_time(tiny_suite: dict) -> None:
    assert {"machine", "results", "peak_rss_bytes", "started_at", "seconds"} <= set(tiny_suite)
    machine = tiny_suite["machine"]
    assert machine["tsc"]["hz"] > 0 and machine["tsc"]["source"]
    assert machine["peak"]["fp32_ops_per_s"] > 0 and machine["threads"] >= 1
    assert tiny_suite["peak_rss_bytes"] > 0


def test_the_report_is_a_table_with_the_figures_that_matter(tiny_suite: dict) -> None:
    report = bench.format_report(tiny_suite)
    for text in ("workload", "gemm_1024", "GEMM 1024 vs numpy", "encoder layer", "miss rate"):
        assert text in report
    assert "SIW issue" in report and "peak memory" in report
    assert "INCORRECT" not in report


def test_a_wrong_result_is_flagged_loudly(with_fakes: None) -> None:
    suite = bench.run_suite(["broken_gemm"], size="tiny", repeats=1)
    (result,) = suite["results"]
    assert result["correct"] is False
    assert result["max_error"] == pytest.approx(1.0)
    assert suite["incorrect"] == ["broken_gemm"]
    assert "INCORRECT" in bench.format_report(suite)


def test_the_command_exits_1_when_a_result_is_wrong(with_fakes: None, capsys) -> None:
    assert bench.main(["--only", "broken_gemm", "--size", "tiny", "--repeats", "1"]) == 1
    assert "INCORRECT" in capsys.readouterr().out


def test_a_workload_that_raises_becomes_an_error_not_a_crash(with_fakes: None) -> None:
    suite = bench.run_suite(["crashing", "broken_gemm"], size="tiny", repeats=1)
    assert "the kernel is not there" in suite["errors"]["crashing"]
    assert len(suite["results"]) == 2
    assert "FAILED" in bench.format_report(suite)


def test_an_unknown_name_is_refused_with_the_valid_names(capsys) -> None:
    with pytest.raises(bench.UnknownWorkloadError, match="gemm_1024"):
        bench.run_suite(["gemm_1024", "no_such_thing"])
    assert bench.main(["--only", "gemm_256,no_such_thing"]) == 2
    err = capsys.readouterr().err
    assert "no_such_thing" in err and "ppt_random" in err


def test_json_output_is_machine_readable(capsys) -> None:
    argv = ["--json", "--size", "tiny", "--repeats", "1", "--only", "gemm_256,ppt_random"]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    suite = json.loads(captured.out)
    assert [r["name"] for r in suite["results"]] == ["gemm_256", "ppt_random"]
    assert all(r["correct"] for r in suite["results"])
    assert "gemm_256" in captured.err  # progress goes to stderr, never into the JSON


def test_list_prints_every_workload(capsys) -> None:
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bench.WORKLOADS)


def test_bad_repeats_is_a_usage_error(capsys) -> None:
    assert bench.main(["--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err


def test_speedup_is_the_median_of_per_pair_ratios() -> None:
    case = bench.Case(ours=lambda: None, check=None, baseline=lambda: None, ops=1000)
    result = bench._skeleton(_Broken(), {}, 3)
    timing = {
        "ours": [1.0, 2.0, 3.0],
        "baseline": [2.0, 2.0, 9.0],
        "cpu_ns": 6_000_000_000,
        "hw": {},
        "joules": None,
    }
    bench.fill_timing(result, case, timing, {}, {}, "no counters in this test")
    assert result["speedup"] == 2.0  # ratios 2, 1, 3; not median(base)/median(ours) = 1
    assert result["seconds"] == 2.0 and result["baseline_seconds"] == 2.0


def test_time_interleaved_alternates_ours_and_baseline() -> None:
    calls: list[str] = []
    timing = bench.time_interleaved(
        lambda: calls.append("A"), lambda: calls.append("B"), 3, lambda fraction: None
    )
    assert calls == ["A", "B"] * 4  # one warm-up pair, then three timed pairs
    assert len(timing["ours"]) == len(timing["baseline"]) == 3


def test_close_to_rejects_nan_and_wrong_shapes() -> None:
    check = workloads.close_to(np.ones(4), rtol=1e-5, atol_rel=1e-6)
    assert check(np.ones(4)).correct
    assert not check(np.array([1, 1, np.nan, 1])).correct
    assert not check(np.ones(5)).correct
    assert not check(np.ones(4) * 1.001).correct


def test_progress_prints_one_line_per_workload_without_a_tty() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar(1, 2, "gemm_256", 0.0)
    bar(1, 2, "gemm_256", 0.5)
    bar(1, 2, "gemm_256", 1.0, {"seconds": 0.01, "correct": True, "speedup": 1.5})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "[1/2] gemm_256" in lines[0] and "correct" in lines[0]


def test_forced_progress_draws_a_bar() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream, force=True)
    bar(2, 3, "attention", 0.5)
    assert "\r" in stream.getvalue() and "[2/3] attention" in stream.getvalue()
    assert "#" in stream.getvalue() and "50%" in stream.getvalue()
