"""The compute kernels match numpy references on every instruction-set path, and refuse bad input
with a message instead of crashing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf

import vtpu.kernels as K
from vtpu.counters import COUNTERS

AVAILABLE_ISAS = ["generic"] + (["avx2"] if K.cpu_features()["avx2"] else [])


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Run the test once per instruction-set path this CPU can execute, then restore the best."""
    K.set_isa(request.param)
    yield request.param
    K.set_isa()


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- instruction sets ------------------------------------------------------------------------


def test_cpu_features_agree_with_the_kernels_view_in_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    features = K.cpu_features()
    for ours, linux in [("avx2", "avx2"), ("fma", "fma"), ("avx512f", "avx512f")]:
        assert features[ours] == (linux in flags), ours
    assert all(isinstance(v, bool) for v in features.values())


def test_best_isa_is_chosen_at_import_and_restored_by_set_isa_none():
    f = K.cpu_features()
    avx2 = f["avx2"] and f["fma"]
    best = "avx2" if avx2 else "generic"
    if avx2 and f["avx512f"] and f["avx512bw"] and f["avx512vl"]:
        best = "avx512"
    assert K.set_isa() == best
    assert K.isa() == best
    K.set_isa("generic")
    assert K.isa() == "generic"
    K.set_isa(None)
    assert K.isa() == best


@pytest.mark.parametrize("name", ["amx", "AVX2", "avx512_vnni", ""])
def test_set_isa_rejects_instruction_sets_we_do_not_ship(name):
    with pytest.raises(K.KernelInputError, match="instruction set"):
        K.set_isa(name)


def test_num_threads_is_positive():
    assert K.num_threads() >= 1


# ---- gemm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 5), (33, 65, 17), (128, 3, 257)])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_matches_numpy_on_odd_shapes(rng, m, k, n, trans_b):
    a, b = rand(rng, m, k), rand(rng, k, n)
    got = K.gemm(a, np.ascontiguousarray(b.T) if trans_b else b, trans_b=trans_b)
    np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-5)


def test_gemm_accumulates_into_out_with_alpha_and_beta(rng):
    a, b, c = rand(rng, 9, 11), rand(rng, 11, 6), rand(rng, 9, 6)
    out = c.copy()
    K.gemm(a, b, alpha=2.0, beta=0.5, out=out)
    np.testing.assert_allclose(out, 2.0 * (a @ b) + 0.5 * c, rtol=1e-5, atol=1e-5)


def test_gemm_copies_a_non_contiguous_input(rng):
    a = rand(rng, 10, 8)
    b = rand(rng, 8, 20)[:, ::2]
    np.testing.assert_allclose(K.gemm(a.T.T, b), a @ b, rtol=1e-5, atol=1e-5)


def test_gemm_handles_empty_dimensions():
    assert K.gemm(np.zeros((0, 4), np.float32), np.zeros((4, 3), np.float32)).shape == (0, 3)
    out = K.gemm(np.zeros((2, 0), np.float32), np.zeros((0, 3), np.float32))
    assert out.shape == (2, 3) and not out.any()


def test_gemm_counts_two_ops_per_multiply_add(rng):
    before = COUNTERS.snapshot()
    K.gemm(rand(rng, 4, 5), rand(rng, 5, 6))
    after = COUNTERS.snapshot()
    assert after["ops"] - before["ops"] == 2 * 4 * 5 * 6
    assert after["kernel_calls"] - before["kernel_calls"] == 1


def test_gemm_rejects_bad_input_with_reasons(rng):
    a, b = rand(rng, 3, 4), rand(rng, 4, 5)
    with pytest.raises(K.KernelInputError, match="float64"):
        K.gemm(a.astype(np.float64), b)
    with pytest.raises(K.KernelInputError, match="inner dimensions"):
        K.gemm(a, rand(rng, 5, 4))
    with pytest.raises(K.KernelInputError, match="2 dimensions"):
        K.gemm(a[0], b)
    with pytest.raises(K.KernelInputError, match="numpy array"):
        K.gemm(a.tolist(), b)
    with pytest.raises(K.KernelInputError, match="shape"):
        K.gemm(a, b, out=np.empty((3, 4), np.float32))
    with pytest.raises(K.KernelInputError, match="overlaps"):
        sq = rand(rng, 4, 4)
        K.gemm(sq, sq.copy(), out=sq)
    with pytest.raises(K.KernelInputError, match="pass out="):
        K.gemm(a, b, beta=1.0)


# ---- linear: fused bias + activation ---------------------------------------------------------


def act_reference(y: np.ndarray, activation: str) -> np.ndarray:
    y = y.astype(np.float64)
    if activation == "relu":
        return np.maximum(y, 0)
    if activation == "gelu":
        return 0.5 * y * (1 + erf(y / np.sqrt(2)))
    if activation == "gelu_tanh":
        return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
    if activation == "silu":
        return y / (1 + np.exp(-y))
    return y


@pytest.mark.parametrize("activation", sorted(K.ACTIVATIONS))
def test_linear_matches_numpy_for_every_activation(rng, isa, activation):
    x, w, b = rand(rng, 2, 19, 24, scale=2), rand(rng, 24, 13), rand(rng, 13)
    got = K.linear(x, w, b, activation)
    want = act_reference(x.astype(np.float64) @ w + b, activation)
    assert got.shape == (2, 19, 13)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_activations_stay_accurate_and_finite_at_extremes(isa, activation):
    y = np.linspace(-120, 120, 4801, dtype=np.float32).reshape(1, -1)
    got = K.bias_activation(y.copy(), activation=activation)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, act_reference(y, activation), rtol=2e-6, atol=1e-6)


def test_linear_with_torch_layout_weight_over_enough_rows_to_run_in_parallel(rng, isa):
    x, w, b = rand(rng, 2500, 5), rand(rng, 64, 5), rand(rng, 64)
    got = K.linear(x, w, b, "relu", trans_w=True)
    np.testing.assert_allclose(got, np.maximum(x @ w.T + b, 0), rtol=1e-5, atol=1e-5)


def test_linear_without_bias_is_a_plain_gemm(rng):
    x, w = rand(rng, 6, 7), rand(rng, 7, 8)
    np.testing.assert_allclose(K.linear(x, w), x @ w, rtol=1e-5, atol=1e-5)


def test_linear_rejects_bad_input_with_reasons(rng):
    x, w = rand(rng, 4, 6), rand(rng, 6, 3)
    with pytest.raises(K.KernelInputError, match="unknown activation 'tanh'"):
        K.linear(x, w, activation="tanh")
    with pytest.raises(K.KernelInputError, match="bias has length 4"):
        K.linear(x, w, rand(rng, 4))
    with pytest.raises(K.KernelInputError, match="trans_w=False"):
        K.linear(x, w, trans_w=True)


def test_bias_activation_works_in_place_and_refuses_read_only_arrays(rng, isa):
    y, b = rand(rng, 3, 10), rand(rng, 10)
    want = act_reference(y + b, "silu")
    assert K.bias_activation(y, b, "silu") is y
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    y.flags.writeable = False
    with pytest.raises(K.KernelInputError, match="writeable"):
        K.bias_activation(y, b, "relu")


# ---- norms and softmax -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 16, 33, 384])
def test_layer_norm_matches_numpy_even_with_a_large_mean(rng, isa, n):
    x = rand(rng, 11, n) + 1000.0
    g, b = rand(rng, n), rand(rng, n)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(K.layer_norm(x, g, b), want * g + b, rtol=1e-3, atol=1e-3)


def test_layer_norm_can_write_over_its_input(rng, isa):
    x, g, b = rand(rng, 4, 3, 20), rand(rng, 20), rand(rng, 20)
    want = K.layer_norm(x, g, b, 1e-12)
    assert K.layer_norm(x, g, b, 1e-12, out=x) is x
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 15, 64, 129])
def test_rms_norm_matches_numpy(rng, isa, n):
    x, g = rand(rng, 9, n, scale=3), rand(rng, n)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(K.rms_norm(x, g), want, rtol=1e-5, atol=1e-5)


def test_norms_reject_bad_parameters(rng):
    x = rand(rng, 2, 5)
    with pytest.raises(K.KernelInputError, match="gamma has length 4"):
        K.rms_norm(x, rand(rng, 4))
    with pytest.raises(K.KernelInputError, match="eps"):
        K.layer_norm(x, rand(rng, 5), rand(rng, 5), eps=-1.0)
    with pytest.raises(K.KernelInputError, match="overlaps"):
        K.rms_norm(x, rand(rng, 5), out=x[:, :].reshape(2, 5)[::1])


def softmax_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("n", [1, 5, 8, 31, 1000])
def test_softmax_matches_numpy_over_a_wide_range(rng, isa, n):
    x = rand(rng, 6, n, scale=30)
    np.testing.assert_allclose(K.softmax(x), softmax_reference(x), rtol=1e-5, atol=1e-7)


def test_softmax_ignores_minus_inf_and_zeroes_a_fully_masked_row(isa):
    x = np.array([[0.0, -np.inf, 1.0, -np.inf] * 3, [-np.inf] * 12], dtype=np.float32)
    want = softmax_reference(np.nan_to_num(x[0], neginf=-1e9))
    got = K.softmax(x, out=x)
    assert got is x
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-7)
    assert not got[1].any()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-80, 80, width=32, allow_nan=False), min_size=1, max_size=40).map(
        lambda v: np.array([v], dtype=np.float32)
    )
)
def test_softmax_rows_are_distributions(x):
    y = K.softmax(x)
    assert (y >= 0).all() and abs(float(y.sum()) - 1.0) < 1e-5


# ---- attention -------------------------------------------------------------------------------


def attention_reference(q, k, v, causal=False, key_lengths=None, scale=None):
    bsz, heads, sq, d = q.shape
    kv_heads, sk = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    k = np.repeat(k.astype(np.float64), heads // kv_heads, axis=1)
    v = np.repeat(v.astype(np.float64), heads // kv_heads, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) * scale
    mask = np.zeros((bsz, 1, sq, sk), dtype=bool)
    if key_lengths is not None:
        mask |= (np.arange(sk) >= np.asarray(key_lengths)[:, None])[:, None, None, :]
    if causal:
        mask |= np.arange(sk)[None, :] > (np.arange(sq) + sk - sq)[:, None]
    s = np.where(mask, -np.inf, s)
    mx = s.max(-1, keepdims=True)
    e = np.where(mask, 0.0, np.exp(s - np.where(np.isfinite(mx), mx, 0)))
    tot = e.sum(-1, keepdims=True)
    p = np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)
    return p @ v


def test_attention_matches_numpy(rng, isa):
    q, k, v = rand(rng, 2, 3, 7, 16), rand(rng, 2, 3, 9, 16), rand(rng, 2, 3, 9, 16)
    np.testing.assert_allclose(
        K.attention(q, k, v), attention_reference(q, k, v), rtol=1e-5, atol=1e-5
    )


def test_attention_causal_with_kv_cache_and_grouped_heads(rng, isa):
    q, k, v = rand(rng, 1, 8, 5, 12), rand(rng, 1, 2, 11, 12), rand(rng, 1, 2, 11, 12)
    got = K.attention(q, k, v, causal=True, scale=0.3)
    want = attention_reference(q, k, v, causal=True, scale=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_masks_padded_keys_and_zeroes_queries_that_see_none(rng, isa):
    q, k, v = rand(rng, 3, 2, 4, 8), rand(rng, 3, 2, 6, 8), rand(rng, 3, 2, 6, 8)
    lengths = np.array([6, 2, 0])
    got = K.attention(q, k, v, key_lengths=lengths)
    np.testing.assert_allclose(
        got, attention_reference(q, k, v, key_lengths=lengths), rtol=1e-5, atol=1e-5
    )
    assert not got[2].any()


def test_attention_with_no_keys_or_no_queries_returns_zeros_or_nothing(rng):
    q = rand(rng, 1, 2, 3, 4)
    assert not K.attention(q, rand(rng, 1, 1, 0, 4), rand(rng, 1, 1, 0, 4)).any()
    empty = K.attention(rand(rng, 1, 2, 0, 4), rand(rng, 1, 1, 5, 4), rand(rng, 1, 1, 5, 4))
    assert empty.shape == (1, 2, 0, 4)


def test_attention_rejects_bad_shapes_and_lengths(rng):
    q, k = rand(rng, 1, 3, 4, 8), rand(rng, 1, 2, 4, 8)
    with pytest.raises(K.KernelInputError, match="multiple"):
        K.attention(q, k, k)
    with pytest.raises(K.KernelInputError, match="must match"):
        K.attention(q, rand(rng, 1, 3, 4, 8), rand(rng, 1, 3, 5, 8))
    with pytest.raises(K.KernelInputError, match="head size"):
        K.attention(q, rand(rng, 1, 3, 4, 7), rand(rng, 1, 3, 4, 7))
    with pytest.raises(K.KernelInputError, match=r"\[0, 4\]"):
        K.attention(q, q, q, key_lengths=np.array([5]))
    with pytest.raises(K.KernelInputError, match="4 dimensions"):
        K.attention(q[0], q[0], q[0])


# ---- int8 GEMM -------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (4, 16, 2), (5, 17, 3), (37, 100, 29), (8, 300, 9)])
def test_gemm_int8_equals_the_integer_reference(rng, isa, m, k, n):
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    want = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(K.gemm_int8(a, b), want)
    np.testing.assert_array_equal(K.gemm_int8(a, np.ascontiguousarray(b.T), trans_b=True), want)


def test_gemm_int8_does_not_saturate_at_the_extremes(isa):
    a = np.full((5, 1000), -128, dtype=np.int8)
    b = np.full((1000, 3), -128, dtype=np.int8)
    assert (K.gemm_int8(a, b) == 1000 * 128 * 128).all()


def test_gemm_int8_refuses_a_k_that_could_overflow():
    a = np.zeros((1, 131073), dtype=np.int8)
    with pytest.raises(K.KernelInputError, match="overflow int32"):
        K.gemm_int8(a, a, trans_b=True)
    with pytest.raises(K.KernelInputError, match="int8"):
        K.gemm_int8(a.astype(np.int16), a, trans_b=True)


# ---- top-k similarity ------------------------------------------------------------------------


def topk_reference(queries, keys, k, metric):
    q, kk = queries.astype(np.float64), keys.astype(np.float64)
    s = q @ kk.T
    if metric == "cosine":
        qn, kn = np.linalg.norm(q, axis=1), np.linalg.norm(kk, axis=1)
        s = s / np.where(qn == 0, np.inf, qn)[:, None] / np.where(kn == 0, np.inf, kn)[None, :]
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_topk_similarity_matches_numpy(rng, isa, metric):
    queries, keys = rand(rng, 10, 24), rand(rng, 500, 24)
    idx, scores = K.topk_similarity(queries, keys, 7, metric=metric)
    want_idx, want_scores = topk_reference(queries, keys, 7, metric)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_topk_similarity_across_key_blocks_with_ties_lists_lower_index_first(isa):
    # 4096 queries make the score block 512 keys wide, so 1500 keys take three blocks
    keys = np.zeros((1500, 4), dtype=np.float32)
    keys[[3, 700, 1499], 0] = 2.0  # three keys tie for the best dot product
    keys[[10, 1200], 0] = 1.0
    queries = np.zeros((4096, 4), dtype=np.float32)
    queries[:, 0] = 1.0
    idx, scores = K.topk_similarity(queries, keys, 5, metric="dot")
    assert (idx == [3, 700, 1499, 10, 1200]).all()
    assert (scores == [2, 2, 2, 1, 1]).all()


def test_topk_similarity_gives_zero_vectors_zero_cosine(rng):
    keys = rand(rng, 5, 3)
    keys[2] = 0
    idx, scores = K.topk_similarity(np.zeros(3, np.float32), keys, 5)
    assert idx.shape == (5,) and (scores == 0).all() and (idx == np.arange(5)).all()


def test_topk_similarity_rejects_bad_k_nan_and_mismatched_dimensions(rng):
    q, keys = rand(rng, 2, 4), rand(rng, 6, 4)
    for bad_k in (0, 7, 2.0, True):
        with pytest.raises(K.KernelInputError, match="k must be"):
            K.topk_similarity(q, keys, bad_k)
    keys[1, 1] = np.nan
    with pytest.raises(K.KernelInputError, match="finite"):
        K.topk_similarity(q, keys, 2)
    with pytest.raises(K.KernelInputError, match="dimensions"):
        K.topk_similarity(q, rand(rng, 6, 5), 2)
    with pytest.raises(K.KernelInputError, match="metric"):
        K.topk_similarity(q, rand(rng, 6, 4), 2, metric="l2")


# ---- gather / scatter ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.float64])
def test_gather_rows_equals_fancy_indexing_for_any_dtype(rng, dtype):
    table = (rng.standard_normal((50, 3, 7)) * 50).astype(dtype)
    index = rng.integers(0, 50, 200)
    np.testing.assert_array_equal(K.gather_rows(table, index), table[index])


def test_gather_rows_writes_into_out_and_counts_no_ops(rng):
    table = rand(rng, 30, 16)
    out = np.empty((3, 16), np.float32)
    before = COUNTERS.snapshot()["ops"]
    assert K.gather_rows(table, [29, 0, 29], out=out) is out
    assert COUNTERS.snapshot()["ops"] == before
    np.testing.assert_array_equal(out, table[[29, 0, 29]])


@pytest.mark.parametrize("bad", [[-1], [30], [0, 31]])
def test_gather_rows_rejects_out_of_range_indices(rng, bad):
    with pytest.raises(K.KernelInputError, match="outside the table's 30 rows"):
        K.gather_rows(rand(rng, 30, 4), np.array(bad))


def test_gather_rows_rejects_float_indices_and_strided_tables(rng):
    with pytest.raises(K.KernelInputError, match="integers"):
        K.gather_rows(rand(rng, 5, 4), np.array([1.0]))
    with pytest.raises(K.KernelInputError, match="C-contiguous"):
        K.gather_rows(rand(rng, 5, 4)[:, ::2], [1])
    with pytest.raises(K.KernelInputError, match="Python objects"):
        K.gather_rows(np.array([object()] * 3), [0])


def test_scatter_rows_writes_in_place_and_the_last_repeat_wins(rng):
    table = np.zeros((6, 3), np.float32)
    rows = rand(rng, 3, 3)
    K.scatter_rows(table, [4, 1, 4], rows)
    np.testing.assert_array_equal(table[4], rows[2])
    np.testing.assert_array_equal(table[1], rows[1])
    assert not table[[0, 2, 3, 5]].any()
    with pytest.raises(K.KernelInputError, match="rows must be"):
        K.scatter_rows(table, [0], rand(rng, 1, 4))


# ---- threading -------------------------------------------------------------------------------


def test_kernels_large_enough_to_run_in_parallel_still_match_the_references(rng, isa):
    x, g, b = rand(rng, 64, 600, scale=4), rand(rng, 600), rand(rng, 600)
    np.testing.assert_allclose(K.softmax(x), softmax_reference(x), rtol=1e-5, atol=1e-7)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(K.layer_norm(x, g, b), want * g + b, rtol=1e-4, atol=1e-4)
    q, k, v = rand(rng, 2, 4, 32, 16), rand(rng, 2, 2, 40, 16), rand(rng, 2, 2, 40, 16)
    got = K.attention(q, k, v, causal=True, key_lengths=np.array([40, 35]))
    want = attention_reference(q, k, v, causal=True, key_lengths=[40, 35])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    a = rng.integers(-128, 128, (67, 130), dtype=np.int8)
    bi = rng.integers(-128, 128, (130, 70), dtype=np.int8)
    np.testing.assert_array_equal(K.gemm_int8(a, bi), a.astype(np.int64) @ bi.astype(np.int64))


def test_an_invalid_thread_count_in_the_environment_is_reported_by_name():
    env = {**os.environ, "VTPU_NUM_THREADS": "lots"}
    proc = subprocess.run(
        [sys.executable, "-c", "import vtpu.kernels"], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "VTPU_NUM_THREADS='lots' is not a positive integer" in proc.stderr


def test_quantize_int8_round_trips_within_half_a_step(rng):
    x = rand(rng, 7, 50, scale=3)
    x[3] = 0
    q, scale = K.quantize_int8(x)
    assert q.dtype == np.int8 and scale.shape == (7,) and q.min() >= -127
    assert (np.abs(q.astype(np.float32) * scale[:, None] - x) <= scale[:, None] * 0.5001).all()
    assert scale[3] == 1 and not q[3].any()
    with pytest.raises(K.KernelInputError, match="finite"):
        K.quantize_int8(np.array([[np.nan]], np.float32))


def test_linear_int8_is_close_to_the_float_linear_layer(rng, isa):
    x, w, b = rand(rng, 33, 96), rand(rng, 40, 96), rand(rng, 40)
    (xq, xs), (wq, ws) = K.quantize_int8(x), K.quantize_int8(w)
    got = K.linear_int8(xq, xs, wq, ws, b, "gelu")
    exact = act_reference(xq.astype(np.float64) * xs[:, None] @ (wq * ws[:, None]).T + b, "gelu")
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4)
    want = act_reference(x.astype(np.float64) @ w.T + b, "gelu")
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    with pytest.raises(K.KernelInputError, match="w_scale has length 39"):
        K.linear_int8(xq, xs, wq, ws[:39])


@pytest.mark.parametrize(("name", "ufunc"), [("add", np.add), ("mul", np.multiply)])
def test_elementwise_kernels_match_numpy_with_row_broadcast_and_in_place(name, ufunc):
    kernel = getattr(K, name)
    a = np.random.default_rng(1).standard_normal((7, 13)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((7, 13)).astype(np.float32)
    row = b[0].copy()
    np.testing.assert_array_equal(kernel(a, b), ufunc(a, b))
    np.testing.assert_array_equal(kernel(a, row), ufunc(a, row))
    np.testing.assert_array_equal(kernel(a[:, ::2], b[:, ::2]), ufunc(a[:, ::2], b[:, ::2]))
    expected = ufunc(a, b)
    assert kernel(a, b, out=a) is a
    np.testing.assert_array_equal(a, expected)
    with pytest.raises(K.KernelInputError, match="must have a's shape or be a row"):
        kernel(a, b[:, :5])
    with pytest.raises(K.KernelInputError, match="float32"):
        kernel(a.astype(np.float64), b)


def test_dispatch_info_names_the_path_of_every_kernel():
    info = K.dispatch_info()
    assert info["softmax"] == ("avx2" if K.isa() == "avx512" else K.isa())
    assert {"gemm", "gemm_int8", "attention", "layer_norm", "add"} <= set(info)


# ---- what the dispatch says ------------------------------------------------------------------


def test_attention_is_not_said_to_use_blas_and_the_blas_is_detected() -> None:
    info = K.dispatch_info()
    assert "BLAS" in info["attention"] and "no BLAS" in info["attention"]
    assert "sgemm" not in info["attention"]
    library = K.blas_library()
    assert library != "unknown BLAS"
    assert library in info["gemm"]
    maps = open("/proc/self/maps").read().lower()
    if "openblas" in maps:
        assert library.startswith("OpenBLAS") and "loaded" in library


# ---- one op-count table ----------------------------------------------------------------------


def test_kernels_sentron_and_bench_count_attention_ops_the_same() -> None:
    from vtpu import ops
    from vtpu.arena import Arena
    from vtpu.bench import workloads
    from vtpu.counters import COUNTERS
    from vtpu.sentron import Sentron

    heads, s, d = 2, 16, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, s, d), dtype=np.float32) for _ in range(3))
    before = COUNTERS.snapshot()["ops"]
    K.attention(q, k, v)
    kernel_ops = COUNTERS.snapshot()["ops"] - before
    program = f"""
.tensor q f32[{heads},{s},{d}] random(1)
.tensor k f32[{heads},{s},{d}] random(2)
.tensor v f32[{heads},{s},{d}] random(3)
.tensor y f32[{heads},{s},{d}] output
D.attention y, q, k, v
C.halt
"""
    with Sentron(Arena(1 << 20)) as sentron:
        sentron_ops = sentron.run(program).ops
    bench_ops = workloads._attention_ops(heads, s, d)
    table = ops.attention(ops.attention_scores(s, s, heads=heads), heads * s, d)
    assert kernel_ops == sentron_ops == bench_ops == table
    case = workloads.Attention().build(heads=heads, s=s, d=d)
    assert case.ops == table
