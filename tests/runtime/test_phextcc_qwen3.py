"""phextcc's Qwen3 frontend: the decoder as IR, compiled by the passes, run by phextcc.run and
checked against transformers' Qwen3ForCausalLM and against vtpu.models.qwen3.Qwen3Model.

Tolerance: fp32 logits agree with transformers' within 1e-4 of the largest |logit| (measured: below
1e-6), at every position of the prefill graph and every step of the decode graph; greedy tokens
agree exactly. Against Qwen3Model (same packing, same kernels) in every precision: within 1e-4 of
the largest |logit| too (measured: about 4e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vtpu import phextcc  # noqa: E402
from vtpu.kernels import packed  # noqa: E402
from vtpu.models.bert import ModelLoadError  # noqa: E402
from vtpu.models.qwen3 import Qwen3Model, read_config  # noqa: E402
from vtpu.phextcc import CompileError, compile_graph, infer_shapes  # noqa: E402
from vtpu.phextcc import qwen3 as frontend  # noqa: E402

TOL = 1e-4  # of the largest |logit|
PROMPTS = [[3, 17, 101, 5, 250, 9, 77], [8, 9, 10]]
LAYERS = 2


def write_model(directory: Path, *, heads=4, kv=2, hidden=96, head_dim=32, tied=True,
                dtype=None, seed=0) -> Path:  # fmt: skip
    """A random Qwen3 as transformers writes it; GQA ratio heads/kv, head_dim != hidden/heads."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=hidden,
        intermediate_size=160,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.25,  # larger than the default, so greedy tokens vary
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("gqa2"))


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_every_pass_keeps_the_logits_of_transformers(model_dir, hf) -> None:
    ids = np.array([PROMPTS[0]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    outputs: dict[str, np.ndarray] = {}

    def after(name: str, graph: phextcc.Graph) -> None:
        if name != "frontend":
            outputs[name] = frontend.prefill(graph, ids)

    compile_graph(frontend.build_graph(model_dir), after)
    assert list(outputs) == [name for name, _ in phextcc.PASSES]
    for name, logits in outputs.items():
        assert logits.shape == (1, len(PROMPTS[0]), 300)
        assert rel(logits, ref) < TOL, name


def test_an_untied_mha_model_with_top_level_theta(tmp_path) -> None:
    directory = write_model(tmp_path / "m", heads=4, kv=4, hidden=64, head_dim=16, tied=False)
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    del raw["rope_parameters"]
    raw.update(rope_theta=1000000.0, rope_scaling=None)  # the older dialect
    path.write_text(json.dumps(raw))
    hf = transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    graph = compile_graph(frontend.build_graph(directory))
    assert "lm_head.weight" in graph.weights
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel(frontend.prefill(graph, ids), ref) < TOL


def test_the_passes_fuse_what_the_issue_names(model_dir) -> None:
    graph = compile_graph(frontend.build_graph(model_dir, precision="int8"))
    kinds = Counter(op.kind for op in graph.ops)
    assert kinds == {
        "gather": 1,
        "rms_norm": 1,  # layer 0's input norm: every other norm follows a residual add
        "linear": 4 * LAYERS + 1,  # qkv, o, gate+up, down; lm_head
        "qk_norm_rope": LAYERS,
        "attention": LAYERS,
        "add_rms_norm": 2 * LAYERS,
        "swiglu": LAYERS,
    }
    fused = [op for op in graph.ops if op.kind == "add_rms_norm"]
    # each sum is the residual stream the next add reads, but the last feeds only the final norm
    assert [len(op.extra) for op in fused] == [1] * (2 * LAYERS - 1) + [0]
    assert all(op.attrs.get("in_place") for op in fused)
    att = [op for op in graph.ops if op.kind == "attention"]
    assert all(op.attrs["packed"] and op.attrs["kv_heads"] == 2 for op in att)
    wqkv = graph.weights["l0.ctx.wqkv"]
    assert isinstance(wqkv, packed.PackedWeight) and wqkv.precision == "int8"
    assert wqkv.shape == ((4 + 2 * 2) * 32, 96)  # GQA widths, head_dim 32 != 96 / 4
    assert graph.weights["l0.mlp.wgu"].shape == (2 * 160, 96)
    # tied: one packed table for the embedding gather and the lm_head
    assert graph.ops[0].inputs[0] == graph.ops[-1].inputs[1] == "model.embed_tokens.weight"
    assert all(op.attrs["precision"] == "int8" for op in graph.ops if op.kind == "linear")
    for name, w in graph.weights.items():
        if not isinstance(w, packed.PackedWeight):
            assert w.dtype == np.float32 and w.ndim == 1, name  # only the norms stay fp32
    text = graph.text()
    assert "(linear weights: int8)" in text
    assert "l1.h1, l0.res2 = add_rms_norm(l0.res1, l0.mlp_out," in text


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_compiled_graph_equals_the_hand_written_model(model_dir, precision) -> None:
    model = Qwen3Model(model_dir, precision, cache_bytes=1 << 20)
    graph = compile_graph(frontend.build_graph(model_dir, precision=precision))
    for prompt in PROMPTS:
        seq = model.new_sequence()
        ref = model.prefill(seq, prompt)
        model.free(seq)
        ours = frontend.prefill(graph, np.array([prompt]))[0, -1]
        assert rel(ours, ref) < TOL, prompt
    # the same resident bytes: packing neither loses nor duplicates a weight
    assert sum(w.nbytes for w in graph.weights.values()) == model.nbytes


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_loaded_models_weights_compile_without_a_copy(model_dir, precision) -> None:
    model = Qwen3Model(model_dir, precision, cache_bytes=1 << 20)
    graph = compile_graph(frontend.graph_from_model(model))
    for n, layer in enumerate(model.layers):
        for fused, own in ((f"l{n}.ctx.wqkv", layer.wqkv), (f"l{n}.mlp.wgu", layer.wgu)):
            w = graph.weights[fused]
            assert w.shape == own.shape and w.data.ctypes.data == own.data.ctypes.data
            assert w.scale is None or w.scale.ctypes.data == own.scale.ctypes.data
    assert graph.weights["model.embed_tokens.weight"] is model.embed
    assert sum(w.nbytes for w in graph.weights.values()) == model.nbytes
    seq = model.new_sequence()
    ref = model.prefill(seq, PROMPTS[0])
    assert rel(frontend.prefill(graph, np.array([PROMPTS[0]]))[0, -1], ref) < TOL
    with pytest.raises(CompileError, match="packed .* in int8; the graph reads it in bf16"):
        graph = frontend.graph_from_model(Qwen3Model(model_dir, "int8", cache_bytes=1 << 20))
        graph.precision = "bf16"
        compile_graph(graph)


def test_a_bf16_checkpoint_is_packed_from_its_raw_bits(tmp_path) -> None:
    directory = write_model(tmp_path / "bf16", dtype=torch.bfloat16)
    graph = compile_graph(frontend.build_graph(directory, precision="bf16"))
    model = Qwen3Model(directory, "bf16", cache_bytes=1 << 20)
    seq = model.new_sequence()
    ref = model.prefill(seq, PROMPTS[0])
    assert rel(frontend.prefill(graph, np.array([PROMPTS[0]]))[0, -1], ref) < TOL


def test_the_decode_graph_generates_what_transformers_generates(model_dir, hf) -> None:
    """Two sequences at different positions in one batch, each fed its prompt one token a step
    and then its own greedy tokens: the decode graph alone, through its KV cache."""
    config = read_config(model_dir)
    graph = compile_graph(frontend.build_graph(model_dir, decode=True))
    assert Counter(op.kind for op in graph.ops)["kv_append"] == LAYERS
    assert all(op.attrs.get("packed") for op in graph.ops if op.kind.endswith("attention"))
    steps = 10
    cache = frontend.new_cache(config, len(PROMPTS), 32)
    seqs = [list(p) for p in PROMPTS]
    logits: list[list[np.ndarray]] = [[], []]
    for pos in range(max(len(p) for p in PROMPTS) + steps):
        ids = [s[pos] for s in seqs]
        out = frontend.decode(graph, cache, ids, [pos, pos])
        for b, s in enumerate(seqs):
            logits[b].append(out[b])
            if pos + 1 == len(s):
                s.append(int(out[b].argmax()))
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                              min_new_tokens=steps, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)  # fmt: skip
        generated = seqs[b][len(prompt) : len(prompt) + steps]
        assert generated == ref.sequences[0, len(prompt) :].tolist()
        for i, step in enumerate(ref.logits):
            assert rel(logits[b][len(prompt) - 1 + i], step[0].numpy()) < TOL


def test_bad_graphs_and_inputs_are_refused_with_the_reason(model_dir, tmp_path) -> None:
    graph = frontend.build_graph(model_dir)
    bad = next(op for op in graph.ops if op.output == "l1.mlp_out")
    bad.inputs[1] = "model.layers.1.mlp.up_proj.weight"  # (160, 96): K does not match
    with pytest.raises(CompileError, match=r"l1\.mlp_out = linear\(.*x features vs weight K"):
        infer_shapes(graph)
    with pytest.raises(ModelLoadError, match="precision 'fp8' is not implemented"):
        frontend.build_graph(model_dir, precision="fp8")
    config = read_config(model_dir)
    weights = frontend.read_weights(model_dir)
    del weights["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"weights missing: model\.layers\.1\.mlp\.down_proj"):
        frontend.graph_from_weights(config, weights, "broken")
    weights = frontend.read_weights(model_dir)
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    with pytest.raises(ModelLoadError, match="does not implement: .*q_proj.bias"):
        frontend.graph_from_weights(config, weights, "biased")
    weights = frontend.read_weights(model_dir)
    nan = np.array(weights["model.layers.0.mlp.up_proj.weight"])
    nan[3, 5] = np.nan
    weights["model.layers.0.mlp.up_proj.weight"] = nan
    with pytest.raises(CompileError, match=r"weight l0\.mlp\.wgu: pack: w must be finite"):
        compile_graph(frontend.graph_from_weights(config, weights, "nan"))
    decode = compile_graph(frontend.build_graph(model_dir, decode=True))
    cache = frontend.new_cache(config, 1, 4)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\)"):
        frontend.decode(decode, cache, [5], [4])
    with pytest.raises(ValueError, match="1 ids but 2 positions"):
        frontend.decode(decode, cache, [5], [0, 1])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ModelLoadError, match="hidden_size is missing"):
        frontend.build_graph(tmp_path)


def test_vtpu_compile_dumps_a_qwen3_directory(model_dir, tmp_path) -> None:
    def vtpu(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vtpu", "compile", *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    proc = vtpu(str(model_dir), "--precision", "int8")
    assert proc.returncode == 0, proc.stderr
    headers = [line.split(":")[0][len("# after ") :] for line in proc.stdout.splitlines()
               if line.startswith("# after ")]  # fmt: skip
    assert headers == ["frontend", *(name for name, _ in phextcc.PASSES)]
    assert "# after fuse_gate_up: 25 ops" in proc.stdout
    assert "l0.ctx = attention(l0.ctx.qkv_rope) heads=4 kv_heads=2 head_dim=32 causal=True " \
           "packed=True  : [B,S,128]" in proc.stdout  # fmt: skip
    assert "l0.mlp = swiglu(l0.mlp.gu)  : [B,S,160]" in proc.stdout
    assert "logits = linear(final, model.embed_tokens.weight) precision=int8  : [B,S,300]" in (
        proc.stdout
    )
    decode = vtpu(str(model_dir), "--decode", "--final")
    assert decode.returncode == 0, decode.stderr
    assert "input  cache.1: f32[2,B,2,T,32]" in decode.stdout
    assert "l1.cache = kv_append(cache.1, l1.ctx.qkv_rope, positions)" in decode.stdout
    siw = vtpu(str(model_dir), "--siw")  # the program itself: test_phextcc_qwen3_siw.py
    assert siw.returncode == 0 and "as SIW for batch 1 x 16 tokens: 21 words" in siw.stdout
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    other = vtpu(str(tmp_path))
    assert other.returncode == 2 and "model_type 'llama' has no phextcc frontend" in other.stderr
    missing = vtpu(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
