"""CPU detection: features from CPUID checked against the kernel, TSC, caches, the peak model."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtpu import _tsc, cpu
from vtpu.cpu import FEATURES, calibrate_tsc, cpu_info, detect_features, peak_ops, tsc_frequency

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz
cpu MHz\t\t: 3100.000
flags\t\t: fpu tsc constant_tsc avx avx2 fma

processor\t: 1
vendor_id\t: GenuineIntel
"""

MAX_BASIC_LEAF = (_tsc.cpuid(0) or (0,))[0]
needs_no_tsc_leaves = pytest.mark.skipif(
    MAX_BASIC_LEAF >= 0x15, reason="this CPU states its TSC in CPUID, which takes precedence"
)


def test_cpuid_vendor_matches_the_kernels() -> None:
    info = cpu_info()
    kernel = cpu.parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert info.vendor == kernel["vendor_id"]
    assert info.family == int(kernel["cpu family"])
    assert info.model == int(kernel["model"])


def test_every_usable_feature_is_also_listed_by_the_kernel() -> None:
    info = cpu_info()
    flags = set(cpu.parse_cpuinfo(Path("/proc/cpuinfo").read_text())["flags"].split())
    assert set(info.features) == set(FEATURES)
    for name, usable in info.features.items():
        if usable:
            assert name in flags


def test_vector_path_follows_the_features() -> None:
    info = cpu_info()
    if info.features["avx512f"] and info.features["avx512bw"] and info.features["avx512vl"]:
        assert info.vector_path == "avx512"
    elif info.features["avx2"] and info.features["fma"]:
        assert info.vector_path == "avx2"
    else:
        assert info.vector_path == "sse"


def test_logical_cpus_are_those_this_process_may_use() -> None:
    import os

    info = cpu_info()
    assert info.logical_cpus == len(os.sched_getaffinity(0))
    assert info.physical_cores is None or 1 <= info.physical_cores <= info.logical_cpus


def test_caches_are_read_from_sysfs_in_bytes() -> None:
    caches = cpu_info().caches
    if not caches:
        pytest.skip("no cache information in sysfs")
    assert caches["L1d"]["bytes"] >= 16 * 1024
    assert all(c["bytes"] > 0 for c in caches.values())


def test_reported_tsc_frequency_agrees_with_a_calibration() -> None:
    tsc = cpu_info().tsc
    assert tsc["source"]
    measured = calibrate_tsc(0.05)
    assert measured == pytest.approx(tsc["hz"], rel=0.05)


@needs_no_tsc_leaves
def test_tsc_comes_from_cpu_mhz_only_when_the_kernel_knows_it_and_no_cpufreq(
    tmp_path: Path,
) -> None:
    fields = cpu.parse_cpuinfo(CPUINFO.replace("constant_tsc", "constant_tsc tsc_known_freq"))
    (tmp_path / "cpu0").mkdir()
    found = tsc_frequency(fields, tmp_path)
    assert found == {"hz": 3.1e9, "source": "/proc/cpuinfo cpu MHz (tsc_known_freq)"}
    # With a cpufreq driver "cpu MHz" is the current clock: use the nominal one instead.
    (tmp_path / "cpu0" / "cpufreq").mkdir()
    found = tsc_frequency(fields, tmp_path)
    assert found == {"hz": 2.0e9, "source": "model name nominal clock (constant_tsc)"}


@needs_no_tsc_leaves
def test_tsc_is_calibrated_when_nothing_states_it(tmp_path: Path) -> None:
    found = tsc_frequency({"model name": "Mystery CPU", "flags": "tsc"}, tmp_path)
    assert found["source"] == "calibrated rdtsc vs CLOCK_MONOTONIC"
    assert found["hz"] > 1e8


def test_parse_cpuinfo_reads_only_the_first_processor() -> None:
    fields = cpu.parse_cpuinfo(CPUINFO)
    assert fields["model name"].endswith("@ 2.00GHz")
    assert fields["processor"] == "0"


def test_peak_model_for_zen3_avx2() -> None:
    features = dict.fromkeys(FEATURES, False) | {"avx": True, "avx2": True, "fma": True}
    peak = peak_ops("AuthenticAMD", 0x19, features, cores=2, clock_hz=2.5e9, clock_source="x")
    assert peak["fp32_ops_per_s"] == 2 * 8 * 2 * 2 * 2.5e9
    # vpmaddubsw + vpmaddwd: 32 int8 multiply-adds per two issues, two pipes.
    assert peak["int8_ops_per_s"] == 2 * 32 / 2 * 2 * 2 * 2.5e9
    assert "2 cores x 8 fp32 lanes (avx2)" in peak["source"]
    assert "Zen 3" in peak["source"]


def test_peak_model_for_a_xeon_with_avx512_vnni() -> None:
    features = dict.fromkeys(FEATURES, True)
    peak = peak_ops("GenuineIntel", 6, features, cores=1, clock_hz=1e9, clock_source="x")
    assert peak["fp32_ops_per_s"] == 16 * 2 * 2 * 1e9
    assert peak["int8_ops_per_s"] == 64 * 2 * 2 * 1e9
    assert "VNNI" in peak["source"]


def test_zen4_avx512_counts_one_double_pumped_unit() -> None:
    features = dict.fromkeys(FEATURES, False) | {
        k: True for k in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")
    }
    peak = peak_ops("AuthenticAMD", 0x19, features, cores=1, clock_hz=1e9, clock_source="x")
    assert peak["fp32_ops_per_s"] == 16 * 1 * 2 * 1e9


class FakeCpuid:
    """CPUID with every feature bit set, and a chosen XCR0."""

    def __init__(self, xcr0: int | None) -> None:
        self.xcr0 = xcr0

    def cpuid(self, leaf: int, subleaf: int = 0):
        if leaf == 0:
            return (0xD, 0, 0, 0)
        return (0xFFFFFFFF,) * 4

    def xgetbv0(self):
        return self.xcr0


def test_avx512_and_amx_without_os_state_are_reported_but_not_used(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_tsc", FakeCpuid(xcr0=0b111))  # x87, SSE, AVX only
    features, notes = detect_features(flags=None)
    assert features["avx2"] and features["fma"]
    assert not features["avx512f"] and not features["amx_tile"]
    assert notes["avx512f"] == "present but not enabled by the OS (XCR0 lacks AVX-512 state)"
    assert notes["amx_int8"] == "present but not enabled by the OS (XCR0 lacks AMX tile state)"


def test_amx_is_usable_when_the_os_saves_tile_state(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_tsc", FakeCpuid(xcr0=0b111 | 0b111 << 5 | 0b11 << 17))
    features, notes = detect_features(flags=None)
    assert all(features.values()) and not notes


def test_a_feature_the_kernel_masks_is_not_used(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "_tsc", FakeCpuid(xcr0=0xFFFFFFFF))
    flags = set(FEATURES) - {"avx2"}
    features, notes = detect_features(flags)
    assert not features["avx2"]
    assert "does not list it in /proc/cpuinfo" in notes["avx2"]


def test_caches_parse_a_sysfs_tree(tmp_path: Path) -> None:
    for index, (level, kind, size, shared) in enumerate(
        [
            ("1", "Data", "48K", "0,8"),
            ("2", "Unified", "2048K", "0,8"),
            ("3", "Unified", "105M", "0-15"),
        ]
    ):
        d = tmp_path / "cache" / f"index{index}"
        d.mkdir(parents=True)
        for name, value in (
            ("level", level),
            ("type", kind),
            ("size", size),
            ("shared_cpu_list", shared),
        ):
            (d / name).write_text(value + "\n")
    caches = cpu._caches(tmp_path)
    assert caches == {
        "L1d": {"bytes": 48 * 1024, "shared_by_cpus": 2},
        "L2": {"bytes": 2 << 20, "shared_by_cpus": 2},
        "L3": {"bytes": 105 << 20, "shared_by_cpus": 16},
    }
