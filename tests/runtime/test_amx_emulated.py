"""The AMX kernels of runtime/vtpu/kernels/_simd.h (AMX-INT8 for linear_dynamic_int8, AMX-BF16
for linear_bf16) run here on a software model of the tile instructions (_amx_emulate.h), so they
are checked on any CPU with AVX-512, AMX or not: built by gcc from their own source with the
model in place of the tiles, against the AVX-512 paths they replace (bit for bit for int8, to
fp32 rounding for bf16; bf16 also bit for bit against the SDM's order of TDPBF16PS), with weights
from the real packers, on edge shapes, and in buffers that end at an unmapped page. The model is
itself checked against the SDM's definitions and faults. What it cannot show: that Linux grants
the tile state, and speed (test_int8.py and test_bf16.py cover those where the CPU has AMX)."""

from __future__ import annotations

import ctypes
import dataclasses
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vtpu import kernels as K
from vtpu.models.bert import INT8_DYNAMIC_GROUP

ROOT = Path(__file__).resolve().parents[2]
GCC = shutil.which("gcc")
FEATURES = K.cpu_features()
AVX512 = all(FEATURES[f] for f in ("avx512f", "avx512bw", "avx512vl"))
needs_vnni = pytest.mark.skipif(
    not (AVX512 and FEATURES["avx512_vnni"]),
    reason="this CPU has no AVX-512 VNNI (the AMX-INT8 kernel's non-tile part and its reference)",
)
needs_bf16 = pytest.mark.skipif(
    not (AVX512 and FEATURES["avx512_bf16"]),
    reason="this CPU has no AVX512_BF16 (the AMX-BF16 kernel's reference, vdpbf16ps)",
)
pytestmark = pytest.mark.skipif(GCC is None, reason="no gcc to build the kernels with the model")

# The AMX-INT8 kernel serves K and groups multiples of 64 and 1..16 rows; AMX-BF16 K a multiple
# of 32. Outlier channels are zero in the packed weight and in the activations.
INT8_SHAPES = [(64, 64), (192, INT8_DYNAMIC_GROUP), (384, INT8_DYNAMIC_GROUP)]


def _outliers(k: int) -> list[int]:
    return [0, 5, k - 1]


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("amx") / "amx_emulated.so"
    proc = subprocess.run(
        [GCC, "-O2", "-shared", "-fPIC", "-std=gnu11", "-Werror=implicit-function-declaration",
         "-I", str(ROOT / "runtime" / "vtpu" / "kernels"),
         str(ROOT / "tests" / "runtime" / "amx_emulated.c"), "-o", str(out), "-lm"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def _load(path: Path | str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i, p, n = ctypes.c_int, ctypes.c_void_p, ctypes.c_long
    lib.q8_rows.argtypes = [i, p, n, p, n, n, p, p, n, p, n, n, n]
    lib.q8_rows.restype = n
    lib.bf16_rows.argtypes = [i, p, n, p, n, p, n, n, n]
    lib.bf16_rows.restype = n
    lib.tile_product.argtypes = [p, i, p, n, p, n, p, n]
    lib.tile_product.restype = None
    lib.tile_zero_released.restype = None
    lib.guarded_bytes.argtypes = [n]
    lib.guarded_bytes.restype = p
    return lib


@pytest.fixture(scope="module")
def lib(lib_path: Path) -> ctypes.CDLL:
    return _load(lib_path)


# ---- AMX-INT8 -----------------------------------------------------------------------------------


def _int8_operands(rows: int, k: int, n: int, group: int, buf_rows: int, seed: int):
    """A packed weight (the real packer) and activations as vtpu_q8_quantize leaves them: levels
    in [-127, 127], 0 in the outlier channels and in the rows past `rows`."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq = K.pack_int8_weight(w, group=group, outliers=_outliers(k))
    kp = 4 * -(-k // 4)
    a = np.zeros((buf_rows, kp), np.int8)
    a[:rows, :k] = rng.integers(-127, 128, (rows, k)) * wq.keep
    return w, wq, a


def _int8_gemm(
    lib: ctypes.CDLL,
    amx: int,
    wq: K.Int8Weight,
    a: np.ndarray,
    rows: int,
    c: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """linear_dynamic_int8's GEMM on AMX (amx=1) or VNNI; A is scratch, so a is passed as is
    (copy it to keep it). Returns C (NaN where unwritten) and the tile products run."""
    if c is None:
        c = np.full((rows, wq.n), np.nan, np.float32)
    kp = a.shape[1]
    products = lib.q8_rows(
        amx, a.ctypes.data, kp, wq.packed.ctypes.data, kp // 4, wq.group // 4,
        wq.scale.ctypes.data, wq.gsum.ctypes.data, wq.scale.shape[1], c.ctypes.data, wq.n,
        rows, wq.n,
    )  # fmt: skip
    return c, products


def _int8_exact(w: np.ndarray, wq: K.Int8Weight, a: np.ndarray, rows: int) -> np.ndarray:
    """The GEMM's definition in float64, from W (not its packing) and the packer's scales:
    F = sum over groups of the group's scale times its exact integer sum."""
    k = w.shape[1]
    scale = wq.scale[:, : wq.n]  # (groups, N)
    q = np.clip(np.rint(w * wq.keep / np.repeat(scale, wq.group, axis=0)[:k].T), -127, 127)
    f = np.zeros((rows, wq.n))
    for g, g0 in enumerate(range(0, k, wq.group)):
        ints = a[:rows, g0 : g0 + wq.group].astype(np.int64) @ q[:, g0 : g0 + wq.group].T
        f += ints * scale[g].astype(np.float64)
    return f


@needs_vnni
@pytest.mark.parametrize("k,group", INT8_SHAPES)
@pytest.mark.parametrize("n", [8, 24, 40, 100])  # 1, 3, 5 (4 + 1) and 13 ragged panels of 8
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_amx_int8_is_the_vnni_path_bit_for_bit(
    lib: ctypes.CDLL, rows: int, n: int, k: int, group: int
) -> None:
    w, wq, a = _int8_operands(rows, k, n, group, buf_rows=16, seed=rows * 1000 + n + k)
    vnni, none = _int8_gemm(lib, 0, wq, a.copy(), rows)
    amx, products = _int8_gemm(lib, 1, wq, a.copy(), rows)
    assert none == 0
    assert products == -(-n // 8) * (k // 4) // 16, "every panel and K step on the tiles"
    assert np.isfinite(amx).all() and np.array_equal(amx, vnni)
    exact = _int8_exact(w, wq, a, rows)
    np.testing.assert_allclose(vnni, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


@needs_vnni
@pytest.mark.parametrize(
    "rows,k,group",
    [(17, 128, 64), (16, 96, 32), (16, 128, 32), (16, 132, 64)],
    ids=["17 rows", "K 96", "group 32", "K 132"],
)
def test_amx_int8_leaves_other_shapes_to_vnni(
    lib: ctypes.CDLL, rows: int, k: int, group: int
) -> None:
    _, wq, a = _int8_operands(rows, k, 40, group, buf_rows=24, seed=k + rows)
    vnni, _ = _int8_gemm(lib, 0, wq, a.copy(), rows)
    amx, products = _int8_gemm(lib, 1, wq, a.copy(), rows)
    assert products == 0 and np.array_equal(amx, vnni)


# ---- AMX-BF16 -----------------------------------------------------------------------------------


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 to bf16 bits, to nearest with ties to even (vtpu_f32_to_bf16)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _bf16_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bf16_operands(rows: int, k: int, n: int, seed: int):
    """x and W, the weight packed by the real packer and x's rows as linear_bf16 hands them to
    the kernel: bf16, K padded to pairs, zero rows up to its 48-row block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    kh = -(-k // 2)
    a = np.zeros((48, 2 * kh), np.uint16)
    a[:rows, :k] = _bf16_bits(x)
    return x, w, K.pack_bf16_weight(w), a


def _bf16_gemm(
    lib: ctypes.CDLL,
    amx: int,
    wb: K.Bf16Weight,
    a: np.ndarray,
    rows: int,
    c: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    if c is None:
        c = np.full((rows, wb.n), np.nan, np.float32)
    kh = a.shape[1] // 2
    products = lib.bf16_rows(
        amx, a.ctypes.data, kh, wb.packed.ctypes.data, kh, c.ctypes.data, wb.n, rows, wb.n
    )
    return c, products


def _tdpbf16ps_sum(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """What the AMX-BF16 kernel computes, from the SDM's TDPBF16PS: C = 0, then per 16 pairs of
    K, the pairs' even products and their odd products summed in two fp32 chains, and
    C += even + odd. Products of bf16 values are exact in fp32, so a float32 add of one is the
    instruction's fused multiply-add."""
    xb, wb = _bf16_float(_bf16_bits(x)), _bf16_float(_bf16_bits(w))
    c = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for p0 in range(0, x.shape[1] // 2, 16):
        even, odd = np.zeros_like(c), np.zeros_like(c)
        for p in range(p0, p0 + 16):
            even += xb[:, 2 * p, None] * wb[None, :, 2 * p]
            odd += xb[:, 2 * p + 1, None] * wb[None, :, 2 * p + 1]
        c += even + odd
    return c


@needs_bf16
@pytest.mark.parametrize("k", [32, 384])
@pytest.mark.parametrize("n", [16, 40, 100])  # 1, 3 (2 + 1) and 7 ragged panels of 16
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 33, 48])
def test_amx_bf16_is_the_sdm_sum_and_vdpbf16ps_to_rounding(
    lib: ctypes.CDLL, rows: int, n: int, k: int
) -> None:
    x, w, wb, a = _bf16_operands(rows, k, n, seed=rows * 1000 + n + k)
    vdp, none = _bf16_gemm(lib, 0, wb, a, rows)
    amx, products = _bf16_gemm(lib, 1, wb, a, rows)
    assert none == 0
    assert products == -(-n // 16) * -(-rows // 16) * (k // 2) // 16, "all of it on the tiles"
    assert np.isfinite(amx).all() and np.array_equal(amx, _tdpbf16ps_sum(x, w))
    np.testing.assert_allclose(amx, vdp, rtol=1e-5, atol=1e-3)  # as test_bf16.py compares


@needs_bf16
@pytest.mark.parametrize("k", [48, 33])
def test_amx_bf16_leaves_other_shapes_to_vdpbf16ps(lib: ctypes.CDLL, k: int) -> None:
    _, _, wb, a = _bf16_operands(20, k, 40, seed=k)
    vdp, _ = _bf16_gemm(lib, 0, wb, a, 20)
    amx, products = _bf16_gemm(lib, 1, wb, a, 20)
    assert products == 0 and np.array_equal(amx, vdp)


# ---- buffers: nothing read or written past what the callers promise ----------------------------


def _guarded(lib: ctypes.CDLL, a: np.ndarray) -> np.ndarray:
    """A copy of a whose last byte is followed by an unmapped page."""
    ptr = lib.guarded_bytes(a.nbytes)
    assert ptr, "no memory for a guarded buffer"
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * a.nbytes).from_address(ptr))
    g = raw.view(a.dtype).reshape(a.shape)
    g[...] = a
    return g


def _run_guarded(lib_path: str, kind: str) -> None:
    """In a child process (a fault kills it, not pytest): each kernel with A holding only the
    rows its dispatcher promises (int8: zeroed up to a multiple of 8; bf16: readable up to a
    multiple of 16), and C and the packed weight exactly their size, all ending at an unmapped
    page; the results must match the same call on ordinary buffers."""
    lib = _load(lib_path)
    if kind == "int8":
        k, group = INT8_SHAPES[-1]
        for rows in (1, 7, 8, 16):
            _, wq, a = _int8_operands(rows, k, 100, group, buf_rows=16, seed=rows)
            want, _ = _int8_gemm(lib, 1, wq, a.copy(), rows)
            guarded = dataclasses.replace(wq, packed=_guarded(lib, wq.packed))
            c = _guarded(lib, np.full((rows, wq.n), np.nan, np.float32))
            got, products = _int8_gemm(lib, 1, guarded, _guarded(lib, a[: -(-rows // 8) * 8]),
                                       rows, c)  # fmt: skip
            assert products > 0 and np.array_equal(got, want), rows
    else:
        for rows in (1, 7, 16, 17, 33, 48):
            _, _, wb, a = _bf16_operands(rows, 384, 100, seed=rows)
            want, _ = _bf16_gemm(lib, 1, wb, a, rows)
            guarded = dataclasses.replace(wb, packed=_guarded(lib, wb.packed))
            c = _guarded(lib, np.full((rows, wb.n), np.nan, np.float32))
            got, products = _bf16_gemm(lib, 1, guarded, _guarded(lib, a[: -(-rows // 16) * 16]),
                                       rows, c)  # fmt: skip
            assert products > 0 and np.array_equal(got, want), rows


@pytest.mark.parametrize(
    "kind", [pytest.param("int8", marks=needs_vnni), pytest.param("bf16", marks=needs_bf16)]
)
def test_amx_kernels_stay_inside_their_buffers(lib_path: Path, kind: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys; from tests.runtime.test_amx_emulated import _run_guarded; "
         "_run_guarded(sys.argv[1], sys.argv[2])", str(lib_path), kind],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != -signal.SIGSEGV, f"AMX-{kind} touched memory past its buffers"
    assert proc.returncode == 0, proc.stderr


# ---- the model itself: the SDM's arithmetic, and its faults --------------------------------------


def _config(tiles: dict[int, tuple[int, int]], palette: int = 1) -> np.ndarray:
    """A 64-byte tile configuration: tile -> (rows, bytes a row)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = palette
    for t, (rows, colsb) in tiles.items():
        cfg[16 + 2 * t : 18 + 2 * t] = np.array([colsb], "<u2").view(np.uint8)
        cfg[48 + t] = rows
    return cfg


def _tile_product(lib: ctypes.CDLL, cfg: np.ndarray, op: int, c, a, b) -> None:
    lib.tile_product(
        cfg.ctypes.data, op, c.ctypes.data, c.strides[0], a.ctypes.data, a.strides[0],
        b.ctypes.data, b.strides[0],
    )  # fmt: skip


def test_the_model_runs_tdpbusd_as_the_sdm_defines(lib: ctypes.CDLL) -> None:
    """C (5 x 6 dwords) += A (5 x 3 dwords of u8) . B (3 x 6 dwords of s8), wrapping in int32;
    the store writes each row's 24 bytes and nothing past them."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (5, 12), dtype=np.uint8)
    b = rng.integers(-128, 128, (3, 24), dtype=np.int8)
    a[0], b[0] = 255, -128  # the extremes, on the products that meet them
    c = np.full((5, 10), -1, np.int32)  # rows of 40 bytes: 24 in the tile, 16 sentinels
    c[:, :6] = rng.integers(-(2**31), 2**31, (5, 6), dtype=np.int64)
    want = c.astype(np.int64)
    want[:, :6] += np.einsum(
        "mki,kni->mn", a.reshape(5, 3, 4).astype(np.int64), b.reshape(3, 6, 4).astype(np.int64)
    )
    want = want.astype(np.uint32).view(np.int32)  # wraps like the instruction
    _tile_product(lib, _config({0: (5, 24), 1: (5, 12), 2: (3, 24)}), 0, c, a, b)
    assert np.array_equal(c, want)


def test_the_model_runs_tdpbf16ps_in_the_sdm_order_with_denormals_flushed(lib) -> None:
    """C (4 x 3) += A (4 x 5 pairs) . B (5 x 3 pairs) against the SDM's pseudocode in numpy,
    bit for bit. Rows 0 and 3 are random; row 1's products in column 0 are denormal (flushed:
    0, not ~1e-40); row 2 reads a denormal bf16 input and a denormal C (taken as 0)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    y = rng.standard_normal((5, 6)).astype(np.float32) * 8
    x[1] *= np.float32(1e-20)
    x[2] = 0
    y[:, 0:2] *= np.float32(1e-20)
    a, b = _bf16_bits(x), _bf16_bits(y)
    a[2, 0], b[0, 4] = 0x0001, 0x5F00  # 9.2e-41 x 2^63 in column 2: 8.5e-22 if read
    c = rng.standard_normal((4, 3)).astype(np.float32)
    c[1, 0] = 0
    c[2] = [0, 1e-39, 0]

    def ftz(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0) * v, v)

    xs, ys = ftz(_bf16_float(a)), ftz(_bf16_float(b))
    want = np.empty_like(c)
    for m in range(4):
        temp = np.zeros(6, np.float32)  # the even and odd chains of each of the 3 columns
        for k in range(5):  # temp[2n + i] += A[m][2k + i] * B[k][2n + i]
            temp = ftz(temp + np.tile(xs[m, 2 * k : 2 * k + 2], 3) * ys[k])
        want[m] = ftz(ftz(c[m]) + ftz(temp[0::2] + temp[1::2]))
    assert want[1, 0] == 0 and not want[2].any()  # what the flushes make of rows 1 and 2
    _tile_product(lib, _config({0: (4, 12), 1: (4, 20), 2: (5, 12)}), 1, c, a, b)
    assert np.array_equal(c.view(np.uint32), want.view(np.uint32))


_FAULT = (
    "import ctypes, sys\n"
    "lib = ctypes.CDLL(sys.argv[1])\n"
    "cfg, op = bytes.fromhex(sys.argv[2]), int(sys.argv[3])\n"
    "if not cfg:\n"
    "    lib.tile_zero_released()\n"
    "n, p = ctypes.c_long, ctypes.c_void_p\n"
    "lib.tile_product.argtypes = [ctypes.c_char_p, ctypes.c_int, p, n, p, n, p, n]\n"
    "bufs = [ctypes.create_string_buffer(16 * 64) for _ in range(3)]\n"
    "lib.tile_product(cfg, op, bufs[0], 64, bufs[1], 64, bufs[2], 64)\n"
)
_GOOD = {0: (16, 64), 1: (16, 64), 2: (16, 64)}


@pytest.mark.parametrize(
    "cfg,op,message",
    [
        (_config(_GOOD, palette=2), 0, "LDTILECFG faults (#GP: palette 2"),
        (_config({**_GOOD, 1: (17, 64)}), 0, "LDTILECFG faults (#GP: tmm1 is 17 rows x 64"),
        (_config({**_GOOD, 2: (16, 68)}), 0, "LDTILECFG faults (#GP: tmm2 is 16 rows x 68"),
        (_config({**_GOOD, 3: (4, 0)}), 0, "LDTILECFG faults (#GP: tmm3 has 4 rows of 0"),
        (np.where(np.arange(64) == 40, 1, _config(_GOOD)).astype(np.uint8), 0,
         "LDTILECFG faults (#GP: reserved byte 40"),
        (_config({**_GOOD, 0: (16, 30)}), 0, "TILELOADD faults (#UD: tmm0 has colsb 30"),
        (_config({**_GOOD, 2: (8, 64)}), 0, "TDPBUSD faults (#UD: shapes do not multiply"),
        (_config({**_GOOD, 1: (15, 64)}), 1, "TDPBF16PS faults (#UD: shapes do not multiply"),
        (_config({**_GOOD, 2: (16, 32)}), 1, "TDPBF16PS faults (#UD: shapes do not multiply"),
        (np.zeros(0, np.uint8), 0, "TILEZERO faults (#UD: tmm0 used with no tile configuration"),
    ],
    ids=["palette", "rows", "colsb", "half tile", "reserved", "colsb % 4", "k", "m", "n",
         "released"],
)  # fmt: skip
def test_the_model_faults_where_hardware_does(
    lib_path: Path, cfg: np.ndarray, op: int, message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FAULT, str(lib_path), cfg.tobytes().hex(), str(op)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGABRT and message in proc.stderr, proc.stderr
