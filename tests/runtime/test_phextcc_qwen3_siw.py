"""The Qwen3 decoder lowered to SIW (phextcc.lower.DecoderModule): the sentron's prefill and
decode programs give exactly what phextcc.run gives for the compiled graphs, in every precision,
read the packed weights in place, update the caller's KV caches in place, and refuse bad input
with the reason."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from tests.runtime.test_phextcc_qwen3 import PROMPTS, write_model  # noqa: E402
from vtpu import phextcc, siw  # noqa: E402
from vtpu.models.qwen3 import Qwen3Model, read_config  # noqa: E402
from vtpu.phextcc import CompileError, compile_graph  # noqa: E402
from vtpu.phextcc import qwen3 as frontend  # noqa: E402
from vtpu.phextcc.lower import DecoderModule  # noqa: E402
from vtpu.sentron import RunError  # noqa: E402
from vtpu.siw import DOp  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("qwen3siw"))


def graphs(model_dir: Path, precision: str) -> tuple[phextcc.Graph, phextcc.Graph]:
    return (
        compile_graph(frontend.build_graph(model_dir, precision=precision)),
        compile_graph(frontend.build_graph(model_dir, precision=precision, decode=True)),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_prefill_and_decode_programs_equal_the_interpreted_graphs_bit_for_bit(
    model_dir, precision
) -> None:
    prefill, decode = graphs(model_dir, precision)
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]])
    module = DecoderModule(prefill)
    np.testing.assert_array_equal(module.prefill(ids), frontend.prefill(prefill, ids))
    np.testing.assert_array_equal(
        module.prefill(ids[:1, :3]), frontend.prefill(prefill, ids[:1, :3])
    )
    # two sequences at different positions, one batch; the caches must match as well
    stepper = DecoderModule(decode)
    config = read_config(model_dir)
    ours, theirs = (frontend.new_cache(config, 2, 16) for _ in range(2))
    for step in range(6):
        tokens, positions = [5 + step, 40 + step], [step, step + 3]
        expected = frontend.decode(decode, theirs, tokens, positions)
        np.testing.assert_array_equal(stepper.step(ours, tokens, positions), expected)
    for name, cache in theirs.items():
        np.testing.assert_array_equal(ours[name], cache)
    assert ours["cache.0"][0, 1, :, 3].any() and not ours["cache.0"][0, 1, :, 9].any()


def test_the_programs_read_packed_weights_in_place_one_word_per_op(model_dir) -> None:
    prefill, decode = graphs(model_dir, "int8")
    module = DecoderModule(prefill, cache_size=2)
    program, out = module.program(2, 5)
    siw.validate(program)
    assert out == "logits" and len(program.words) == len(prefill.ops)
    ops = Counter(DOp(op).name for op in program.words["d_op"])
    assert ops == {"ROWS": 1, "RMSNORM": 1, "MATMUL": 9, "QK_NORM_ROPE": 2, "ATTN_GQA": 2,
                   "ADD_RMSNORM": 4, "SWIGLU": 2}  # fmt: skip
    assert program.words["c_op"][-1] == siw.COp.HALT
    resident = {t.name: t for t in program.tensors if t.init == "resident"}
    table = prefill.weights["model.embed_tokens.weight"]
    assert resident["model_embed_tokens_weight"].dtype == "i8"
    assert resident["model_embed_tokens_weight_scale"].shape == (300,)
    # the arena holds activations only; the extra residents are the stacked gammas and rope table
    activations = sum(t.nbytes for t in program.tensors if t.init == "zeros")
    assert activations < sum(t.nbytes for t in resident.values())
    assert module.resident_bytes == 2 * (2 * 32 * 4) + 16 * 4
    module.prefill(np.array([[1, 2, 3, 4, 5]] * 2))
    prepared, _ = module._prepared[(2, 5)]
    assert any(v is table.data for v in prepared.views)  # bound, not copied
    for shape in ((1, 3), (2, 4), (2, 5)):
        module.prefill(np.ones(shape, np.int64))
    assert list(module._prepared) == [(2, 4), (2, 5)]  # least recently used went first
    # decode: the caches are inout tensors, one word per op as well
    program, _ = DecoderModule(decode).program(3, 32)
    caches = [t for t in program.tensors if t.init == "inout"]
    assert [t.shape for t in caches] == [(2, 3, 2, 32, 32)] * 2
    assert len(program.words) == len(decode.ops)
    text = program.to_text()
    assert "D.kv_append cache_0, " in text and "D.cached_attn " in text and "heads=4" in text
    assert siw.encode(siw.assemble(text)) == siw.encode(program)


def test_a_loaded_models_packed_weights_serve_the_program_without_a_copy(model_dir) -> None:
    model = Qwen3Model(model_dir, "int8", cache_bytes=1 << 20)
    graph = compile_graph(frontend.graph_from_model(model))
    module = DecoderModule(graph)
    ids = np.array([PROMPTS[1]])
    logits = module.prefill(ids)
    np.testing.assert_array_equal(logits, frontend.prefill(graph, ids))
    prepared, _ = module._prepared[(1, len(PROMPTS[1]))]
    bound = {v.ctypes.data for v in prepared.views if v is not None}
    for layer in model.layers:
        assert {layer.wqkv.data.ctypes.data, layer.wqkv.scale.ctypes.data} <= bound
    assert module.resident_bytes < 0.05 * model.nbytes  # stacked gammas and the rope table only
    seq = model.new_sequence()
    reference = model.prefill(seq, PROMPTS[1])
    assert np.abs(logits[0, -1] - reference).max() <= 1e-4 * np.abs(reference).max()


def test_bad_decode_input_is_a_run_error_with_the_reason(model_dir) -> None:
    _, decode = graphs(model_dir, "fp32")
    module = DecoderModule(decode)
    config = read_config(model_dir)
    cache = frontend.new_cache(config, 1, 4)
    with pytest.raises(RunError, match=r"kv_append.*positions must lie in \[0, 4\)"):
        module.step(cache, [5], [4])
    with pytest.raises(RunError, match=r"D\.rows.*id 300 is outside the table's 300 rows"):
        module.step(cache, [300], [0])
    shared = dict(cache)
    shared["cache.1"] = cache["cache.0"]
    with pytest.raises(RunError, match="'cache_0' and 'cache_1' share memory"):
        module.step(shared, [5], [0])
    frozen = {k: v.copy() for k, v in cache.items()}
    frozen["cache.0"].flags.writeable = False
    with pytest.raises(RunError, match="updated in place: pass a C-contiguous, writeable"):
        module.step(frozen, [5], [0])
    with pytest.raises(RunError, match=r"input 'cache_1' is float64\[2, 1, 2, 4, 32\]"):
        module.step({**cache, "cache.1": cache["cache.1"].astype(np.float64)}, [5], [0])
    with pytest.raises(ValueError, match="1 ids and 2 positions"):
        module.step(cache, [5], [0, 1])
    with pytest.raises(CompileError, match="at least 1"):
        module.program(0, 4)
    with pytest.raises(CompileError, match="not a decoder graph"):
        DecoderModule(phextcc.Graph("bert", [], [], [], {}))
    assert not cache["cache.0"].any()  # nothing ran past a refusal


def test_vtpu_compile_siw_prints_a_decoder_program_and_disasm_reads_it(model_dir, tmp_path):
    out = tmp_path / "decode.siw"
    vtpu = [sys.executable, "-m", "vtpu"]
    proc = subprocess.run(
        [*vtpu, "compile", str(model_dir), "--siw", "--decode", "--precision", "int8",
         "--batch", "2", "--seq", "64", "-o", str(out)],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "as SIW for batch 2 x 1 token, a KV cache of 64 tokens per sequence: 23 words" in (
        proc.stdout
    )
    for needle in ("cache_1 f32[2,2,2,64,32] inout", "i8[256,96] resident", "D.kv_append",
                   "D.cached_attn", "D.qk_norm_rope", "D.matmul", "D.rows", "| C.halt"):  # fmt: skip
        assert needle in proc.stdout
    disasm = subprocess.run([*vtpu, "disasm", str(out)], capture_output=True, text=True,
                            timeout=120, check=True).stdout  # fmt: skip
    program = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#"))
    assert disasm.strip() == program.strip()


# ---- the node's paged KV cache: Qwen3Model.compile() ------------------------------------------


def _histories(model: Qwen3Model, reference: bool, prompts, steps: int):
    """Prefill three sequences, then decode them batched; every logits row, and the sequences."""
    seqs = [model.new_sequence() for _ in prompts]
    out = [model.prefill(s, p, reference=reference) for s, p in zip(seqs, prompts, strict=True)]
    tokens = [int(np.argmax(row)) for row in out]
    for _ in range(steps):
        logits = model.decode(seqs, tokens, reference=reference)
        out.extend(logits)
        tokens = [int(t) for t in np.argmax(logits, axis=1)]
    return out, seqs


@pytest.mark.parametrize("precision, isa", [("fp32", None), ("bf16", None), ("int8", None),
                                            ("int8", "generic")])  # fmt: skip
def test_compiled_prefill_and_decode_equal_the_hand_written_forward_bit_for_bit(
    model_dir, precision, isa, monkeypatch
) -> None:
    from vtpu import kernels as K
    from vtpu.models import qwen3

    monkeypatch.setattr(qwen3, "PREFILL_CHUNK", 4)  # chunks of 4, 4 and 1 token below
    previous = K.isa()
    K.set_isa(isa)  # None: the best this CPU has
    try:
        _compiled_equals_hand_written(model_dir, precision)
    finally:
        K.set_isa(previous)


def _compiled_equals_hand_written(model_dir: Path, precision: str) -> None:
    model = Qwen3Model(model_dir, precision, cache_bytes=1 << 20, page_tokens=4)
    model.compile()
    # three sequences of different lengths, across page boundaries, batched in every step
    prompts = [PROMPTS[0], [7, 8, 9, 10, 11, 12, 13, 14, 15], [42]]
    ours, siw_seqs = _histories(model, False, prompts, steps=6)
    theirs, ref_seqs = _histories(model, True, prompts, steps=6)
    assert len(ours) == 3 + 6 * 3
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)
    arena = model.cache.arena
    for s, r in zip(siw_seqs, ref_seqs, strict=True):
        assert s.length == r.length and s.pages != r.pages
        np.testing.assert_array_equal(arena[list(s.pages)], arena[list(r.pages)])
    # the programs ran: one per chunk length with or without logits, one per batch size
    prefill, decode = model.compiled
    assert set(prefill._prepared) == {(1, 4, 0), (1, 3, 1), (1, 1, 1)}  # 4+3, 4+4+1, 1
    assert set(decode._prepared) == {(3, 1, 1)}
    program = decode._prepared[(3, 1, 1)][0].program
    ops = Counter(DOp(op).name for op in program.words["d_op"])
    assert ops["KV_STORE_PAGED"] == ops["PAGED_ATTN"] == 2 and "KV_APPEND" not in ops
    assert len(program.words) == 3 + 9 * 2
    kv = next(t for t in program.tensors if t.name == "kv")
    assert kv.init == "inout" and kv.shape == arena.shape
    text = program.to_text()
    assert "D.kv_store_paged kv, " in text and " layer=1 " in text and "D.paged_attn " in text
    assert siw.encode(siw.assemble(text)) == siw.encode(program)
    # the sentron counts the step's ops from the page table as the kernels count them
    from vtpu.counters import COUNTERS

    seqs = siw_seqs
    frames, starts = model.cache.prepare(seqs, [1] * 3)
    lengths = np.array([s.length + 1 for s in seqs])
    feeds = {"ids": np.array([[1], [2], [3]]), "rope": np.stack(model._rope(lengths - 1)),
             "pages": model._page_table(frames, starts, lengths), "kv": arena}  # fmt: skip
    before = COUNTERS.snapshot()["ops"]
    result = decode._sentron.run(decode._prepared[(3, 1, 1)][0], feeds)
    assert result.ops > 0 and COUNTERS.snapshot()["ops"] - before == result.ops
    assert model.nbytes > Qwen3Model(model_dir, precision, cache_bytes=1 << 20).nbytes


def test_the_compiled_step_counts_real_ppt_lookups_and_frees_pages(model_dir) -> None:
    from vtpu.counters import COUNTERS

    model = Qwen3Model(model_dir, "fp32", cache_bytes=1 << 20, page_tokens=4)
    model.compile()
    seq = model.new_sequence()
    model.prefill(seq, PROMPTS[0])
    before = COUNTERS.snapshot()["ppt_lookups"]
    model.decode([seq], [5])
    assert COUNTERS.snapshot()["ppt_lookups"] - before == 2  # 8 tokens: both pages translated
    model.free(seq)
    assert model.cache_stats()["pages_used"] == 0
    with pytest.raises(ValueError, match="was freed"):
        model.decode([seq], [5])


def _paged_program(model: Qwen3Model, bsz: int = 1, seq: int = 1):
    module = model.compiled[1 if seq == 1 else 0]
    return module, module.program(bsz, seq, 1)[0]


def test_bad_paged_programs_are_program_errors_with_the_reason(model_dir) -> None:
    model = Qwen3Model(model_dir, "fp32", cache_bytes=1 << 18, page_tokens=4)
    model.compile()
    _, program = _paged_program(model, bsz=2)
    text = program.to_text()
    siw.assemble(text)
    cases = {
        "layer=1 eps": ("layer=7 eps", r"layer=7; kv holds 2 layers"),
        ".tensor pages i64[2,": (".tensor pages i32[2,", "pages 'pages' must be i64"),
        ".tensor rope f32[2,2,32]": (".tensor rope f32[2,2,16]", r"rope must be f32 \(2, 2, 32\)"),
        "kv f32[64,2,2,2,128]": ("kv f32[64,2,4,256]", r"must be f32 \(frames, layers, 2, kv_h"),
        "kv f32[64,2,2,2,128] inout": ("kv f32[64,2,2,2,128] resident", "read-only"),
    }
    for old, (new, reason) in cases.items():
        assert old in text, old
        with pytest.raises(siw.ProgramError, match=reason):
            siw.assemble(text.replace(old, new, 1))
    # the fifth operand is kv_store_paged's alone; its page size is bounded by the kernels'
    words = program.words.copy()
    other = int(np.flatnonzero(words["d_op"] == DOp.MATMUL)[0])
    words["d_e"][other] = 1
    with pytest.raises(siw.ProgramError, match="operand e.*kv_store_paged only"):
        siw.validate(siw.Program(program.tensors, words))
    huge = text.replace("kv f32[64,2,2,2,128]", "kv f32[1,2,2,2,8224]")
    with pytest.raises(siw.ProgramError, match="at most 256 tokens a page"):
        siw.assemble(huge)


def test_bad_page_tables_fail_the_run_with_the_reason(model_dir) -> None:
    model = Qwen3Model(model_dir, "fp32", cache_bytes=1 << 18, page_tokens=4)
    model.compile()
    module = model.compiled[1]
    frames = model.cache.pages_total
    width = 1 + model._max_pages
    rope = np.zeros((2, 1, 32), np.float32)
    ids = np.array([[5]])
    arena = model.cache.arena
    before = arena.copy()

    def step(lengths_and_frames: list[int]) -> None:
        table = np.zeros((1, width), np.int64)
        table[0, : len(lengths_and_frames)] = lengths_and_frames
        module.run_paged(ids, rope, table, arena)

    with pytest.raises(RunError, match=f"frame {frames} is outside the KV arena's {frames}"):
        step([3, frames])
    with pytest.raises(RunError, match="frame -1 is outside"):
        step([6, 0, -1])
    with pytest.raises(RunError, match=r"lengths \[0\] must lie in \[1, "):
        step([0])
    with pytest.raises(RunError, match=rf"lengths \[{4 * width}\] must lie"):
        step([4 * width])
    np.testing.assert_array_equal(arena, before)  # refused before anything was written
    step([2, 3])  # a good table: token 1 of the sequence in frame 3, slot 1
    assert arena[3, :, :, :, :].any() and not arena[:3].any()
