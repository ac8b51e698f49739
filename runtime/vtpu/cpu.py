"""What this CPU is and what it can do at most: ISA features, caches, TSC frequency, peak ops/s.

Features come from CPUID (vtpu._tsc) and are cross-checked with the kernel's /proc/cpuinfo flags:
a feature counts as usable only when the CPU has it *and* the OS saves its register state (XCR0),
since AVX-512 or AMX code faults otherwise. Peak ops/s is a model from those features; its
`source` string states the assumptions, so `utilization` (achieved ÷ peak) can be judged.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from vtpu import _tsc

# (name, CPUID leaf, subleaf, register index 0..3 = eax..edx, bit, /proc/cpuinfo flag)
_FEATURE_BITS = (
    ("sse4_2", 1, 0, 2, 20, "sse4_2"),
    ("avx", 1, 0, 2, 28, "avx"),
    ("fma", 1, 0, 2, 12, "fma"),
    ("f16c", 1, 0, 2, 29, "f16c"),
    ("avx2", 7, 0, 1, 5, "avx2"),
    ("avx512f", 7, 0, 1, 16, "avx512f"),
    ("avx512bw", 7, 0, 1, 30, "avx512bw"),
    ("avx512vl", 7, 0, 1, 31, "avx512vl"),
    ("avx512_vnni", 7, 0, 2, 11, "avx512_vnni"),
    ("avx512_fp16", 7, 0, 3, 23, "avx512_fp16"),
    ("amx_bf16", 7, 0, 3, 22, "amx_bf16"),
    ("amx_tile", 7, 0, 3, 24, "amx_tile"),
    ("amx_int8", 7, 0, 3, 25, "amx_int8"),
    ("avx_vnni", 7, 1, 0, 4, "avx_vnni"),
    ("avx512_bf16", 7, 1, 0, 5, "avx512_bf16"),
)
FEATURES = tuple(f[0] for f in _FEATURE_BITS)

# XCR0 state components: SSE=1, AVX (YMM upper)=2, AVX-512 opmask=5, ZMM_Hi256=6, Hi16_ZMM=7,
# AMX TILECFG=17, TILEDATA=18.
_XCR0_AVX = (1 << 1) | (1 << 2)
_XCR0_AVX512 = _XCR0_AVX | (1 << 5) | (1 << 6) | (1 << 7)
_XCR0_AMX = (1 << 17) | (1 << 18)


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    model_name: str
    family: int
    model: int
    stepping: int
    logical_cpus: int  # usable by this process (affinity)
    physical_cores: int | None  # distinct cores among the usable CPUs
    hypervisor: bool
    caches: dict[str, dict]  # "L1d" -> {"bytes": 32768, "shared_by_cpus": 1}
    features: dict[str, bool]  # usable: CPU has it and the OS enabled its state
    feature_notes: dict[str, str]  # why a feature the CPU has is not usable, or disagreements
    tsc: dict  # {"hz": float, "source": str}
    vector_path: str  # the best vector path the features allow: "avx512", "avx2", "sse"
    peak: dict = field(default_factory=dict)  # see peak_ops()


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict (flags as one string)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpuid_vendor() -> str:
    regs = _tsc.cpuid(0)
    if regs is None:
        return "unknown"
    _, ebx, ecx, edx = regs
    return b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode("ascii", "replace")


def _cpuid_signature() -> tuple[int, int, int]:
    """Display family, model, stepping as the kernel computes them from CPUID leaf 1."""
    eax = (_tsc.cpuid(1) or (0, 0, 0, 0))[0]
    stepping = eax & 0xF
    family = (eax >> 8) & 0xF
    model = (eax >> 4) & 0xF
    if family == 0xF:
        family += (eax >> 20) & 0xFF
    if family >= 6:
        model += ((eax >> 16) & 0xF) << 4
    return family, model, stepping


def _cpuid_brand() -> str | None:
    if (_tsc.cpuid(0x80000000) or (0,))[0] < 0x80000004:
        return None
    raw = b""
    for leaf in (0x80000002, 0x80000003, 0x80000004):
        raw += b"".join(r.to_bytes(4, "little") for r in _tsc.cpuid(leaf))
    return raw.split(b"\0")[0].decode("ascii", "replace").strip() or None


def detect_features(
    flags: set[str] | None = None,
) -> tuple[dict[str, bool], dict[str, str]]:
    """Usable ISA features and notes on those the CPU has but cannot use here.

    `flags` are /proc/cpuinfo's; when CPUID and the kernel disagree (a kernel that masks a
    feature, e.g. with clearcpuid=), the feature is not used and a note says why.
    """
    xcr0 = _tsc.xgetbv0()
    features: dict[str, bool] = {}
    notes: dict[str, str] = {}
    for name, leaf, subleaf, reg, bit, flag in _FEATURE_BITS:
        max_leaf = (_tsc.cpuid(0) or (0,))[0]
        regs = _tsc.cpuid(leaf, subleaf) if leaf <= max_leaf else None
        if leaf == 7 and subleaf == 1 and regs is not None:
            # Subleaf 1 exists only when leaf 7 subleaf 0 says so in eax.
            regs = regs if (_tsc.cpuid(7, 0) or (0,))[0] >= 1 else None
        has = bool(regs and (regs[reg] >> bit) & 1)
        if has and flags is not None and flag not in flags:
            notes[name] = "CPUID reports it but the kernel does not list it in /proc/cpuinfo"
            has = False
        if has:
            need = (
                _XCR0_AMX
                if name.startswith("amx")
                else _XCR0_AVX512
                if name.startswith("avx512")
                else _XCR0_AVX
                if name in ("avx", "avx2", "fma", "f16c", "avx_vnni")
                else 0
            )
            if need and (xcr0 is None or (xcr0 & need) != need):
                what = (
                    "AMX tile" if need == _XCR0_AMX else "AVX-512" if need != _XCR0_AVX else "AVX"
                )
                notes[name] = f"present but not enabled by the OS (XCR0 lacks {what} state)"
                has = False
        features[name] = has
    return features, notes


def _caches(cpu_dir: Path) -> dict[str, dict]:
    caches: dict[str, dict] = {}
    for index in sorted(cpu_dir.glob("cache/index*")):
        level = (_read(index / "level") or "").strip()
        kind = (_read(index / "type") or "").strip()
        size = (_read(index / "size") or "").strip()
        if not level or not size:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        match = re.fullmatch(r"(\d+)([KMG]?)", size)
        if not match:
            continue
        size_bytes = int(match[1]) * {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30}[match[2]]
        shared = _cpu_list(_read(index / "shared_cpu_list") or "")
        caches[f"L{level}{suffix}"] = {"bytes": size_bytes, "shared_by_cpus": len(shared) or None}
    return caches


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return cpus


def _physical_cores(cpus: set[int], sys_cpu: Path) -> int | None:
    cores = set()
    for cpu in cpus:
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        package, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
        if package is None or core is None:
            return None
        cores.add((package.strip(), core.strip()))
    return len(cores) or None


def calibrate_tsc(seconds: float = 0.05) -> float:
    """TSC ticks per second measured against CLOCK_MONOTONIC over `seconds`."""
    t0, c0 = time.perf_counter_ns(), _tsc.rdtsc()
    deadline = t0 + int(seconds * 1e9)
    while time.perf_counter_ns() < deadline:
        pass
    t1, c1 = time.perf_counter_ns(), _tsc.rdtsc()
    return (c1 - c0) * 1e9 / (t1 - t0)


def tsc_frequency(cpuinfo: dict[str, str], sys_cpu: Path) -> dict:
    """{"hz", "source"}: CPUID leaf 0x15/0x16, the hypervisor's leaf, cpuinfo, else calibration."""
    max_leaf = (_tsc.cpuid(0) or (0,))[0]
    if max_leaf >= 0x15:
        den, num, crystal, _ = _tsc.cpuid(0x15)
        if den and num and crystal:
            return {"hz": crystal * num / den, "source": "CPUID leaf 0x15 (crystal x ratio)"}
    if max_leaf >= 0x16:
        base_mhz = _tsc.cpuid(0x16)[0] & 0xFFFF
        if base_mhz:
            return {"hz": base_mhz * 1e6, "source": "CPUID leaf 0x16 (base frequency)"}
    flags = set(cpuinfo.get("flags", "").split())
    if "hypervisor" in flags and (_tsc.cpuid(0x40000000) or (0,))[0] >= 0x40000010:
        tsc_khz = _tsc.cpuid(0x40000010)[0]
        if tsc_khz:
            return {"hz": tsc_khz * 1e3, "source": "CPUID leaf 0x40000010 (hypervisor TSC kHz)"}
    # With tsc_known_freq and no cpufreq driver, the kernel's "cpu MHz" is its TSC frequency;
    # with a cpufreq driver it is the current core clock, which says nothing about the TSC.
    mhz = cpuinfo.get("cpu MHz")
    if "tsc_known_freq" in flags and mhz and not (sys_cpu / "cpu0" / "cpufreq").exists():
        return {"hz": float(mhz) * 1e6, "source": "/proc/cpuinfo cpu MHz (tsc_known_freq)"}
    match = re.search(r"@\s*([\d.]+)\s*GHz", cpuinfo.get("model name", ""))
    if match and "constant_tsc" in flags:
        return {"hz": float(match[1]) * 1e9, "source": "model name nominal clock (constant_tsc)"}
    return {"hz": calibrate_tsc(), "source": "calibrated rdtsc vs CLOCK_MONOTONIC"}


def _fma_units(vendor: str, family: int, path: str) -> tuple[float, str]:
    """Full-width FMA issues per cycle per core for the chosen vector path, with why."""
    if path == "sse":
        return 1.0, "SSE without FMA: one multiply and one add per cycle, counted as one FMA"
    if vendor == "AuthenticAMD":
        if family == 0x17:
            # Zen 1 splits 256-bit ops over its two 128-bit FMA pipes; Zen 2 (same family) has
            # two 256-bit pipes. Zen 1 and Zen+ are models < 0x30; assume the conservative one.
            return 1.0, "AMD family 17h: 2 FMA pipes, 128-bit on Zen 1 (assumed) = 1 x 256-bit"
        if family == 0x19 and path == "avx512":
            return 1.0, "AMD Zen 4: AVX-512 double-pumped on 2 x 256-bit FMA pipes = 1 x 512-bit"
        if family >= 0x19:
            return 2.0, f"AMD family {family:x}h (Zen 3/4/5): 2 FMA pipes per core"
        return 1.0, f"AMD family {family:x}h: 1 FMA unit assumed (older than Zen)"
    if vendor == "GenuineIntel":
        if path == "avx512":
            return 2.0, "Intel Xeon with AVX-512: 2 FMA-512 units (ports 0+5); some SKUs have 1"
        return 2.0, "Intel Haswell and later: 2 x 256-bit FMA units (ports 0 and 1)"
    return 1.0, f"unknown vendor {vendor!r}: 1 FMA unit assumed"


def peak_ops(
    vendor: str,
    family: int,
    features: dict[str, bool],
    cores: int,
    clock_hz: float,
    clock_source: str,
) -> dict:
    """Peak fp32 and int8 ops/s = cores x lanes x FMA units x 2 (multiply-add) x clock."""
    path = _vector_path(features)
    bits = {"avx512": 512, "avx2": 256, "sse": 128}[path]
    fp32_lanes = bits // 32
    units, why = _fma_units(vendor, family, path)
    fp32 = cores * fp32_lanes * units * 2 * clock_hz
    # int8: a VNNI dot-product (vpdpbusd) does 4 multiply-adds per 32-bit lane in one issue;
    # the AVX2 path needs vpmaddubsw + vpmaddwd (two multiply issues) for the same work.
    int8_macs_per_issue = bits // 8
    if path == "avx512" and features.get("avx512_vnni"):
        int8_path, int8_issues = "AVX-512 VNNI (vpdpbusd)", 1
    elif features.get("avx_vnni") and path != "sse":
        int8_path, int8_issues, int8_macs_per_issue = "AVX-VNNI (vpdpbusd ymm)", 1, 32
    else:
        int8_path, int8_issues = f"{path.upper()} vpmaddubsw + vpmaddwd", 2
    int8 = cores * int8_macs_per_issue / int8_issues * units * 2 * clock_hz
    return {
        "fp32_ops_per_s": fp32,
        "int8_ops_per_s": int8,
        "vector_path": path,
        "fp32_lanes": fp32_lanes,
        "fma_units_per_core": units,
        "cores": cores,
        "clock_hz": clock_hz,
        "source": (
            f"model from CPUID: {cores} cores x {fp32_lanes} fp32 lanes ({path}) x {units:g} FMA"
            f" ({why}) x 2 ops x {clock_hz / 1e9:.3g} GHz ({clock_source}, turbo ignored);"
            f" int8 via {int8_path}"
        ),
    }


def _vector_path(features: dict[str, bool]) -> str:
    if features.get("avx512f") and features.get("avx512bw") and features.get("avx512vl"):
        return "avx512"
    if features.get("avx2") and features.get("fma"):
        return "avx2"
    return "sse"


@functools.cache
def cpu_info(
    proc_cpuinfo: str = "/proc/cpuinfo", sys_cpu: str = "/sys/devices/system/cpu"
) -> CpuInfo:
    """This machine's CPU as the runtime sees it (cached: the hardware does not change)."""
    fields = parse_cpuinfo(_read(proc_cpuinfo) or "")
    flags = set(fields.get("flags", "").split()) if "flags" in fields else None
    sys_path = Path(sys_cpu)
    family, model, stepping = _cpuid_signature()
    vendor = _cpuid_vendor()
    usable = set(os.sched_getaffinity(0))
    features, notes = detect_features(flags)
    tsc = tsc_frequency(fields, sys_path)
    hypervisor = bool(((_tsc.cpuid(1) or (0, 0, 0, 0))[2] >> 31) & 1)
    cores_known = _physical_cores(usable, sys_path)
    cores = cores_known or len(usable)
    peak = peak_ops(vendor, family, features, cores, tsc["hz"], f"TSC, {tsc['source']}")
    if cores_known is None:
        peak["source"] += "; physical cores unknown, logical CPUs used"
    return CpuInfo(
        vendor=vendor,
        model_name=_cpuid_brand() or fields.get("model name", "unknown"),
        family=family,
        model=model,
        stepping=stepping,
        logical_cpus=len(usable),
        physical_cores=cores_known,
        hypervisor=hypervisor,
        caches=_caches(sys_path / "cpu0"),
        features=features,
        feature_notes=notes,
        tsc=tsc,
        vector_path=_vector_path(features),
        peak=peak,
    )
