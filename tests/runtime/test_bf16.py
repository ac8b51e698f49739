"""bf16 for the sentence encoder (issue 10): the vdpbf16ps kernel against a numpy reference of
bf16-rounded inputs, bit for bit, on both of its paths; the AMX-BF16 path against it to fp32
rounding where the CPU has AMX; the bf16 encoder against
sentence-transformers on the varied set where the CPU has AVX512_BF16; and the refusal, with the
reason, where it has not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.test_models import MINILM_DIR, VARIED_TEXTS, needs_minilm
from vtpu import kernels as K
from vtpu.models import ModelError, ModelRegistry
from vtpu.models.bert import BertEncoder, ModelLoadError, weight_bytes

FEATURES = K.cpu_features()
HAS_BF16 = all(FEATURES[f] for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))
NO_BF16 = "this CPU has no AVX512_BF16 (vdpbf16ps)"
HAS_AMX = HAS_BF16 and FEATURES["amx_tile"] and FEATURES["amx_bf16"]
NO_AMX = "this CPU has no AMX-BF16 (Intel Sapphire Rapids and later; AMD has none)"


@pytest.fixture(params=["generic", "avx512", "amx"])
def path(request: pytest.FixtureRequest):
    """The kernel's scalar twin (any CPU), its vdpbf16ps body where the CPU has one, and its
    AMX body where the CPU has AMX-BF16."""
    if request.param == "avx512" and not HAS_BF16:
        pytest.skip(NO_BF16)
    if request.param == "amx" and not HAS_AMX:
        pytest.skip(NO_AMX)
    K.set_isa("generic" if request.param == "generic" else "avx512")
    K.use_amx(request.param == "amx")
    assert K.bf16_native() == (request.param != "generic")
    assert K.amx_bf16_native() == (request.param == "amx")
    yield request.param
    K.use_amx(True)
    K.set_isa()


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to bf16 (to nearest, ties to even), as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    return (bits << 16).astype(np.uint32).view(np.float32)


def _reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """What linear_bf16 computes, from its definition: bf16 inputs, exact products, summed in
    float32 a pair at a time, the odd product of each pair first (vdpbf16ps's order)."""
    xr, wr = _bf16(x), _bf16(w)
    if xr.shape[1] % 2:
        xr = np.pad(xr, ((0, 0), (0, 1)))
        wr = np.pad(wr, ((0, 0), (0, 1)))
    s = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for p in range(xr.shape[1] // 2):
        s += xr[:, 2 * p + 1, None] * wr[None, :, 2 * p + 1]
        s += xr[:, 2 * p, None] * wr[None, :, 2 * p]
    return s if bias is None else s + bias


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 9), (13, 384, 70), (50, 97, 130)])
def test_linear_bf16_is_its_reference_bit_for_bit(path: str, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m * 100 + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    y = K.linear_bf16(x, K.pack_bf16_weight(w), b)
    if path == "amx" and k % 32 == 0:  # tiles sum in their own order: equal to fp32 rounding
        np.testing.assert_allclose(y, _reference(x, w, b), rtol=1e-5, atol=1e-3)
    else:
        assert np.array_equal(y, _reference(x, w, b))
    # and an approximation of the fp32 product with bf16's 8-bit mantissa
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + b
    assert np.abs(y - exact).max() <= 2**-7 * np.abs(x).max() * np.abs(w).max() * k


def test_bf16_rounds_to_nearest_even_and_packs_in_pairs() -> None:
    # 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0); just above
    # it rounds up; both sides of the pair layout are read
    x = np.array([[1 + 2**-8, 1 + 2**-8 + 2**-20, 3.0]], np.float32)
    w = np.eye(3, dtype=np.float32)
    packed = K.pack_bf16_weight(w)
    assert packed.packed.dtype == np.uint16 and packed.packed.size == 16 * 2 * 2
    assert packed.nbytes == 128
    y = K.linear_bf16(x, packed)
    assert y.tolist() == [[1.0, 1 + 2**-7, 3.0]]
    again = K.pack_bf16_weight(np.ascontiguousarray(w.T), trans_w=True)
    assert np.array_equal(again.packed, packed.packed)


def test_linear_bf16_takes_batch_axes_activations_and_out(path: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, 64)).astype(np.float32)
    w = K.pack_bf16_weight(rng.standard_normal((40, 64)).astype(np.float32))
    out = np.empty((2, 7, 40), np.float32)
    assert K.linear_bf16(x, w, None, "gelu", out=out) is out
    plain = K.bias_activation(K.linear_bf16(x.reshape(14, 64), w), None, "gelu")
    np.testing.assert_array_equal(out.reshape(14, 40), plain)
    assert K.linear_bf16(np.empty((0, 64), np.float32), w).shape == (0, 40)


@pytest.mark.skipif(not HAS_AMX, reason=NO_AMX)
@pytest.mark.parametrize("m,k,n", [(1, 32, 1), (16, 64, 16), (37, 384, 70), (500, 1536, 384)])
def test_amx_bf16_agrees_with_vdpbf16ps(m: int, k: int, n: int) -> None:
    # rows and columns on and off the 16 x 16 tile grid, K over one and many tile blocks, and
    # enough rows for every thread; the first call also runs the self-check, which must pass
    rng = np.random.default_rng(m + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = K.pack_bf16_weight(rng.standard_normal((n, k)).astype(np.float32))
    K.set_isa("avx512")
    try:
        K.use_amx(False)
        vdp = K.linear_bf16(x, w)
        assert K.use_amx(True)
        amx = K.linear_bf16(x, w)
        assert K.amx_bf16_native(), "the AMX self-check failed: see the log"
        assert "AMX-BF16" in K.dispatch_info()["linear_bf16"]
    finally:
        K.use_amx(True)
        K.set_isa()
    np.testing.assert_allclose(amx, vdp, rtol=1e-5, atol=1e-3)


def test_use_amx_switches_the_path_only_where_the_cpu_has_amx() -> None:
    try:
        assert K.use_amx(False) is False and not K.amx_bf16_native()
        assert "AMX" not in K.dispatch_info()["linear_bf16"]
        assert K.use_amx(True) is HAS_AMX
        assert ("AMX-BF16" in K.dispatch_info()["linear_bf16"]) is HAS_AMX
    finally:
        K.use_amx(True)


def test_linear_bf16_finds_what_bf16_cannot_take_in_its_own_conversion(path: str) -> None:
    """The conversion to bf16 refuses NaN, inf and magnitudes that round to inf (from
    0x7F7F8000 up) in any row and column, the last of an odd K included; the largest value
    below that is taken; and the kernel goes on serving."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((13, 21)).astype(np.float32)
    dense = rng.standard_normal((7, 21)).astype(np.float32) * np.float32(1e-30)
    w = K.pack_bf16_weight(dense)
    good = K.linear_bf16(x, w)
    edge = np.uint32(0x7F7F8000).view(np.float32)
    below = np.uint32(0x7F7F7FFF).view(np.float32)
    for value, reason in [(np.nan, "finite"), (np.inf, "finite"), (-np.inf, "finite"),
                          (edge, "beyond bf16's range"), (-edge, "beyond bf16's range")]:  # fmt: skip
        for column in (0, 20):
            x_bad = x.copy()
            x_bad[11, column] = value
            with pytest.raises(K.KernelInputError, match=reason):
                K.linear_bf16(x_bad, w)
    x_big = np.zeros_like(x)
    x_big[3, 20] = below  # rounds to bf16's largest finite value: taken
    np.testing.assert_allclose(K.linear_bf16(x_big, w), _reference(x_big, dense, None), rtol=1e-6)
    assert np.array_equal(K.linear_bf16(x, w), good)


def test_linear_bf16_refuses_bad_input_with_reasons() -> None:
    w = K.pack_bf16_weight(np.ones((8, 16), np.float32))
    with pytest.raises(K.KernelInputError, match="Bf16Weight from pack_bf16_weight"):
        K.linear_bf16(np.ones((2, 16), np.float32), np.ones((8, 16), np.float32))
    with pytest.raises(K.KernelInputError, match="x has 15 features but the weight takes 16"):
        K.linear_bf16(np.ones((2, 15), np.float32), w)
    with pytest.raises(K.KernelInputError, match="finite"):
        K.linear_bf16(np.full((2, 16), np.inf, np.float32), w)
    with pytest.raises(K.KernelInputError, match="beyond bf16's range"):
        K.linear_bf16(np.full((2, 16), 3.399e38, np.float32), w)
    with pytest.raises(K.KernelInputError, match="finite"):
        K.pack_bf16_weight(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(K.KernelInputError, match="dtype float64"):
        K.pack_bf16_weight(np.ones((2, 2)))


# ---- the encoder in bf16 ----------------------------------------------------------------------


@needs_minilm
@pytest.mark.skipif(not HAS_BF16, reason=NO_BF16)
def test_bf16_minilm_against_sentence_transformers_on_the_varied_set() -> None:
    pytest.importorskip("torch", reason="torch cannot be installed here: no reference")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    reference = model.encode(VARIED_TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    encoder = BertEncoder(MINILM_DIR, "bf16")
    ours = encoder.encode_ids(encoder.tokenize(VARIED_TEXTS))
    cosines = np.sum(ours * reference, axis=1)
    # measured 0.99997-0.99999 on AMD Zen 4; the issue asks 0.999
    assert cosines.min() >= 0.9999, dict(zip(VARIED_TEXTS, cosines.round(6), strict=True))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert encoder.nbytes == weight_bytes(MINILM_DIR, "bf16") < 0.8 * weight_bytes(MINILM_DIR)


@needs_minilm
def test_bf16_loads_only_where_the_cpu_has_avx512_bf16() -> None:
    registry = ModelRegistry(max_bytes=300_000_000, max_batch_tokens=1024)
    if HAS_BF16:
        model = registry.load("all-MiniLM-L6-v2", "bf16")
        assert model.precision == "bf16" and model.encoder.compiled is not None  # SIW serves
        assert model.weight_bytes == weight_bytes(MINILM_DIR, "bf16") == model.encoder.nbytes
        return
    with pytest.raises(ModelError) as info:
        registry.load("all-MiniLM-L6-v2", "bf16")
    assert 400 <= info.value.status < 500 and NO_BF16 in str(info.value)
    assert registry.used_bytes() == 0
    with pytest.raises(ModelLoadError, match="no AVX512_BF16"):
        BertEncoder(MINILM_DIR, "bf16")
