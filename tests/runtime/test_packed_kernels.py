"""vtpu.kernels.packed (issue 11): Linear weights resident in fp32, bf16 and int8, the matmul of
every instruction-set path against a float64 reference of the dequantised weight, pack's
rounding rules, rows(), bad input and op counting.

Tolerance of matmul: the products are exact up to one fp32 rounding and the paths accumulate in
fp32 in different orders, so |y - y_ref| <= K * 2**-24 * (|x| @ |W|.T) + 1e-30, the worst-case
bound of a K-term fp32 sum (the kernels land far inside it).
"""

from __future__ import annotations

import numpy as np
import pytest

from vtpu import kernels as K
from vtpu.counters import COUNTERS
from vtpu.kernels import packed as P

FEATURES = K.cpu_features()
HAS_AVX2 = FEATURES["avx2"] and FEATURES["fma"]
HAS_AVX512 = HAS_AVX2 and FEATURES["avx512f"] and FEATURES["avx512bw"] and FEATURES["avx512vl"]


@pytest.fixture(params=["generic", "avx2", "avx512"])
def isa(request: pytest.FixtureRequest):
    if request.param == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU (or its OS) has no AVX2+FMA")
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU (or its OS) has no AVX-512 F+BW+VL")
    K.set_isa(request.param)
    yield request.param
    K.set_isa()


def _dequantised(w: P.PackedWeight) -> np.ndarray:
    """W as stored, in float64, from the stored arrays and the documented encodings."""
    if w.precision == "fp32":
        return w.data.astype(np.float64)
    if w.precision == "bf16":
        return (w.data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return w.data.astype(np.float64) * w.scale.astype(np.float64)[:, None]


def _check_matmul(x: np.ndarray, w: P.PackedWeight, y: np.ndarray) -> None:
    wd = _dequantised(w)
    ref = x.astype(np.float64) @ wd.T
    bound = x.shape[1] * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(wd).T) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max error {err.max():.3g}, bound {bound.min():.3g}"


@pytest.mark.parametrize("precision", P.PRECISIONS)
# every register-tile height (1..4), then blocks of 4 rows, then the BLAS path
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 20, 64, 300])
def test_matmul_matches_the_dequantised_reference(isa: str, precision: str, m: int) -> None:
    rng = np.random.default_rng(m)
    n, k = 37, 131  # N odd, K no multiple of 8 or 16: every tail path runs
    w = P.pack(rng.standard_normal((n, k)).astype(np.float32), precision)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = P.matmul(x, w)
    assert y.shape == (m, n) and y.dtype == np.float32
    _check_matmul(x, w, y)
    assert isa in P.path(precision, m) or "BLAS sgemm (M" in P.path(precision, m)


def test_matmul_takes_long_prompts_through_blas(isa: str) -> None:
    rng = np.random.default_rng(9)
    for precision in P.PRECISIONS:
        w = P.pack(rng.standard_normal((19, 45)).astype(np.float32), precision)
        x = rng.standard_normal((1100, 45)).astype(np.float32)
        assert "BLAS sgemm" in P.path(precision, 1100)
        _check_matmul(x, w, P.matmul(x, w))


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("m", [1, 5, 20])
def test_matmul_splits_rows_across_threads(isa: str, precision: str, m: int) -> None:
    rng = np.random.default_rng(7)
    n, k = 203, 257
    w = P.pack(rng.standard_normal((n, k)).astype(np.float32), precision)
    x = rng.standard_normal((m, k)).astype(np.float32)
    one = P.matmul(x, w, nthreads=1)
    _check_matmul(x, w, one)
    two = P.matmul(x, w, nthreads=2)
    _check_matmul(x, w, two)


def test_every_path_gives_the_same_products() -> None:
    rng = np.random.default_rng(3)
    w = P.pack(rng.standard_normal((29, 67)).astype(np.float32), "int8")
    x = rng.standard_normal((4, 67)).astype(np.float32)
    results = []
    for name in ["generic"] + ["avx2"] * HAS_AVX2 + ["avx512"] * HAS_AVX512:
        K.set_isa(name)
        try:
            results.append(P.matmul(x, w))
        finally:
            K.set_isa()
    for y in results[1:]:
        np.testing.assert_allclose(y, results[0], rtol=1e-5, atol=1e-5)


def test_matmul_takes_out_and_a_non_contiguous_x() -> None:
    rng = np.random.default_rng(1)
    w = P.pack(rng.standard_normal((9, 16)).astype(np.float32), "bf16")
    wide = rng.standard_normal((2, 32)).astype(np.float32)
    x = wide[:, ::2]
    out = np.full((2, 9), np.nan, np.float32)
    assert P.matmul(x, w, out=out) is out
    _check_matmul(np.ascontiguousarray(x), w, out)


def test_matmul_with_no_features_or_rows() -> None:
    w = P.pack(np.zeros((5, 0), np.float32), "int8")
    assert (P.matmul(np.zeros((2, 0), np.float32), w) == 0).all()
    w = P.pack(np.ones((5, 3), np.float32), "fp32")
    assert P.matmul(np.zeros((0, 3), np.float32), w).shape == (0, 5)


# ---- pack ------------------------------------------------------------------------------------


def test_int8_is_symmetric_per_output_channel() -> None:
    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]], np.float32)
    p = P.pack(w, "int8")
    np.testing.assert_array_equal(p.scale, np.float32([1.0 / 127, 1.0, 3.0 / 127]))
    np.testing.assert_array_equal(p.data, [[64, -127, 32], [0, 0, 0], [127, 64, -32]])
    assert p.nbytes == 9 + 3 * 4 and p.shape == (3, 3) and p.precision == "int8"


def test_int8_rounding_error_is_at_most_half_a_step() -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 100)) * rng.uniform(0.01, 10, (64, 1))).astype(np.float32)
    p = P.pack(w, "int8")
    assert np.abs(p.data).max() == 127 and p.data.min() >= -127
    err = np.abs(_dequantised(p) - w)
    assert (err <= p.scale[:, None] * (0.5 + 1e-5)).all()


def _bf16(values: list[float]) -> np.ndarray:
    return P.pack(np.float32(values).reshape(1, -1), "bf16").data[0]


def test_bf16_rounds_to_nearest_with_ties_to_even() -> None:
    one, ulp = 1.0, 2.0**-7  # bf16 keeps 7 mantissa bits: 1.0 is 0x3F80, 1 + ulp 0x3F81
    got = _bf16([one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0**-20, one + ulp / 4])
    np.testing.assert_array_equal(got, [0x3F80, 0x3F82, 0x3F81, 0x3F80])
    got = _bf16([-(one + ulp / 2), -(one + 3 * ulp / 2), 0.0, -0.0, 2.0**-130])
    np.testing.assert_array_equal(got, [0xBF80, 0xBF82, 0x0000, 0x8000, 0x0008])
    assert P.pack(np.ones((2, 3), np.float32), "bf16").nbytes == 12


def test_raw_bf16_input_packs_to_every_precision() -> None:
    rng = np.random.default_rng(2)
    bits = _bf16(list(rng.standard_normal(40))).reshape(4, 10)
    wide = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(P.pack(bits, "bf16").data, bits)
    np.testing.assert_array_equal(P.pack(bits, "fp32").data, wide)
    from_bits, from_wide = P.pack(bits, "int8"), P.pack(wide, "int8")
    np.testing.assert_array_equal(from_bits.data, from_wide.data)
    np.testing.assert_array_equal(from_bits.scale, from_wide.scale)


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pack_refuses_non_finite_weights(precision: str, bad: float) -> None:
    w = np.ones((3, 4), np.float32)
    w[1, 2] = bad
    with pytest.raises(K.KernelInputError, match="finite"):
        P.pack(w, precision)
    bits = np.full((3, 4), 0x3F80, np.uint16)
    bits[2, 0] = 0x7FC0 if np.isnan(bad) else (0x7F80 if bad > 0 else 0xFF80)
    with pytest.raises(K.KernelInputError, match="finite"):
        P.pack(bits, precision)


def test_pack_refuses_a_value_that_rounds_to_bf16_infinity() -> None:
    w = np.full((1, 2), np.finfo(np.float32).max, np.float32)
    with pytest.raises(K.KernelInputError, match="bf16's range"):
        P.pack(w, "bf16")
    assert P.pack(w, "fp32").data[0, 0] == np.finfo(np.float32).max


@pytest.mark.parametrize(
    "w,precision,match",
    [
        (np.ones((2, 2), np.float64), "fp32", "float32"),
        (np.ones((2, 2), np.int8), "int8", "float32"),
        ([[1.0, 2.0]], "fp32", "float32"),
        (np.ones(4, np.float32), "fp32", "2-D"),
        (np.ones((2, 2), np.float32), "fp16", "precision"),
    ],
)
def test_pack_rejects_bad_input(w: object, precision: str, match: str) -> None:
    with pytest.raises(K.KernelInputError, match=match):
        P.pack(w, precision)


# ---- rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", P.PRECISIONS)
def test_rows_are_the_dequantised_rows(precision: str) -> None:
    rng = np.random.default_rng(4)
    w = P.pack(rng.standard_normal((50, 24)).astype(np.float32), precision)
    ids = np.array([3, 0, 49, 3])
    got = P.rows(w, ids)
    assert got.dtype == np.float32 and got.shape == (4, 24)
    np.testing.assert_array_equal(got, _dequantised(w)[ids].astype(np.float32))
    out = np.empty((2, 24), np.float32)
    assert P.rows(w, [1, 2], out=out) is out
    np.testing.assert_array_equal(out, _dequantised(w)[[1, 2]].astype(np.float32))
    assert P.rows(w, np.array([], np.int64)).shape == (0, 24)


@pytest.mark.parametrize(
    "ids,match",
    [
        (np.array([0, 50]), "outside"),
        (np.array([-1]), "outside"),
        (np.array([0.0, 1.0]), "integers"),
        (np.zeros((2, 2), np.int64), "1-D"),
    ],
)
def test_rows_rejects_bad_ids(ids: np.ndarray, match: str) -> None:
    w = P.pack(np.ones((50, 4), np.float32), "int8")
    with pytest.raises(K.KernelInputError, match=match):
        P.rows(w, ids)


def test_rows_rejects_a_bad_out() -> None:
    w = P.pack(np.ones((5, 4), np.float32), "bf16")
    with pytest.raises(K.KernelInputError, match="shape"):
        P.rows(w, [1, 2], out=np.empty((3, 4), np.float32))
    with pytest.raises(K.KernelInputError, match="C-contiguous"):
        P.rows(w, [1, 2], out=np.empty((2, 8), np.float32)[:, ::2])


# ---- matmul's bad input ----------------------------------------------------------------------

W = P.pack(np.ones((6, 4), np.float32), "int8")
X = np.ones((2, 4), np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: P.matmul(X.astype(np.float64), W), "float32"),
        (lambda: P.matmul(np.ones(4, np.float32), W), "2 dimensions"),
        (lambda: P.matmul(np.ones((2, 5), np.float32), W), "5 features"),
        (lambda: P.matmul(X, np.ones((6, 4), np.float32)), "PackedWeight"),
        (lambda: P.matmul(X, W, out=np.empty((2, 5), np.float32)), "shape"),
        (lambda: P.matmul(X, W, out=np.empty((2, 6), np.float64)), "float32"),
        (lambda: P.matmul(X, W, out=np.empty((2, 12), np.float32)[:, ::2]), "C-contiguous"),
        (lambda: P.matmul(X, W, nthreads=0), "nthreads"),
        (lambda: P.matmul(X, W, nthreads=True), "nthreads"),
    ],
)
def test_matmul_rejects_bad_input(call, match: str) -> None:
    with pytest.raises(K.KernelInputError, match=match):
        call()


def test_matmul_refuses_an_out_that_overlaps_x() -> None:
    w = P.pack(np.ones((4, 4), np.float32), "fp32")
    x = np.ones((2, 4), np.float32)
    with pytest.raises(K.KernelInputError, match="overlaps"):
        P.matmul(x, w, out=x)


def test_set_isa_refuses_a_level_the_cpu_lacks() -> None:
    if HAS_AVX512:
        pytest.skip("this CPU has AVX-512 F+BW+VL, so every level is available")
    with pytest.raises(K.KernelInputError, match="lacks"):
        K.set_isa("avx512")


# ---- ops and dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", P.PRECISIONS)
@pytest.mark.parametrize("m", [1, 100, 1100])
def test_matmul_counts_2mnk_ops_and_rows_none(precision: str, m: int) -> None:
    w = P.pack(np.ones((7, 5), np.float32), precision)
    before = COUNTERS.snapshot()["ops"]
    P.matmul(np.ones((m, 5), np.float32), w)
    assert COUNTERS.snapshot()["ops"] - before == 2 * m * 7 * 5
    before = COUNTERS.snapshot()["ops"]
    P.rows(w, [1, 2])
    assert COUNTERS.snapshot()["ops"] == before


def test_dispatch_info_names_the_path_of_each_precision() -> None:
    info = K.dispatch_info()
    for precision in P.PRECISIONS:
        assert info[f"packed.matmul[{precision}]"].startswith(P.path(precision))
        assert info[f"packed.matmul[{precision}]"].endswith(P.path(precision, 10**6))
        assert K.isa() in P.path(precision, 1)
        assert "BLAS sgemm" in P.path(precision, 10**6)
    with pytest.raises(K.KernelInputError, match="precision"):
        P.path("fp16")


# ---- the embedding model's dynamic int8 kernel on AVX-512 VNNI (issue 10) ---------------------


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 9), (33, 384, 390)])
def test_dynamic_int8_gives_the_same_integers_on_every_path(m: int, k: int, n: int) -> None:
    if not (HAS_AVX512 and FEATURES["avx512_vnni"]):
        pytest.skip("this CPU (or its OS) has no AVX-512 VNNI to compare with AVX2")
    rng = np.random.default_rng(m + k + n)
    w = K.pack_int8_weight(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 0] = 1e3  # one large activation: the rest quantise to small integers
    results = {}
    for name in ("generic", "avx2", "avx512"):
        K.set_isa(name)
        try:
            results[name] = K.linear_dynamic_int8(x, w)
            if name == "avx512":
                assert "vpdpbusd" in K.dispatch_info()["linear_dynamic_int8"]
        finally:
            K.set_isa()
    np.testing.assert_array_equal(results["avx512"], results["avx2"])
    np.testing.assert_array_equal(results["avx512"], results["generic"])


def test_matmul_slices_a_large_weight_for_many_rows(isa: str) -> None:
    # 20 rows pass over W in blocks of 4; a thread's share of this int8 W exceeds the 256 KB slice
    # that stays in L2 between blocks, so it is cut into several slices
    rng = np.random.default_rng(11)
    w = P.pack(rng.standard_normal((1001, 1030)).astype(np.float32), "int8")
    x = rng.standard_normal((20, 1030)).astype(np.float32)
    _check_matmul(x, w, P.matmul(x, w, nthreads=2))
