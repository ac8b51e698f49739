"""Sentron: every slot computes what numpy computes, loops loop, bad input is refused clearly."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vtpu import siw
from vtpu.arena import Arena, ArenaFull
from vtpu.counters import COUNTERS
from vtpu.sentron import (
    RunCancelled,
    RunError,
    Sentron,
    arena_bytes_for,
    random_tensor,
    run_parallel,
    tiled_gemm_inputs,
    tiled_gemm_program,
)
from vtpu.siw import Limits, ProgramError

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def run(text: str, inputs=None, **kw):
    program = siw.assemble(text)
    with Sentron(Arena(arena_bytes_for(program) + 4096), **kw) as sentron:
        return sentron.run(program, inputs or {})


def gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def layer_norm(x, g, b, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def test_dense_ops_match_numpy():
    x, w, b, g = f32(8, 16), f32(16, 32), f32(32), f32(32)
    q, k, v = f32(2, 5, 8), f32(2, 5, 8), f32(2, 5, 8)
    ai = rng.integers(-127, 128, (8, 16), dtype=np.int8)
    bi = rng.integers(-127, 128, (16, 32), dtype=np.int8)
    inputs = dict(x=x, w=w, b=b, g=g, q=q, k=k, v=v, ai=ai, bi=bi)
    out = run(
        """
        .tensor x f32[8,16] input
        .tensor w f32[16,32] input
        .tensor b f32[32] input
        .tensor g f32[32] input
        .tensor q f32[2,5,8] input
        .tensor k f32[2,5,8] input
        .tensor v f32[2,5,8] input
        .tensor ai i8[8,16] input
        .tensor bi i8[16,32] input
        .tensor mm f32[8,32] output
        .tensor accum f32[8,32] output
        .tensor lin f32[8,32] output
        .tensor sum f32[8,32] output
        .tensor prod f32[8,32] output
        .tensor ln f32[8,32] output
        .tensor rms f32[8,32] output
        .tensor sm f32[8,32] output
        .tensor att f32[2,5,8] output
        .tensor cau f32[2,5,8] output
        .tensor ii i32[8,32] output
        D.gemm mm, x, w
        D.gemm accum, x, w
        D.gemm accum, x, w acc
        D.linear lin, x, w, b act=gelu
        D.add sum, mm, lin
        D.mul prod, mm, b
        D.layernorm ln, mm, g, b eps=0.001
        D.rmsnorm rms, mm, g
        D.softmax sm, mm
        D.attention att, q, k, v
        D.attention cau, q, k, v causal scale=0.5
        D.gemm_i8 ii, ai, bi | C.halt
        """,
        inputs,
    ).outputs
    mm = x @ w
    close = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["mm"], mm, **close)
    np.testing.assert_allclose(out["accum"], 2 * mm, **close)
    lin = gelu(mm.astype(np.float64) + b)
    np.testing.assert_allclose(out["lin"], lin, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["sum"], mm + lin, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(out["prod"], mm * b, **close)
    np.testing.assert_allclose(out["ln"], layer_norm(mm, g, b, 1e-3), rtol=1e-3, atol=1e-3)
    rms = mm / np.sqrt((mm**2).mean(-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(out["rms"], rms, rtol=1e-3, atol=1e-3)
    e = np.exp(mm - mm.max(-1, keepdims=True))
    np.testing.assert_allclose(out["sm"], e / e.sum(-1, keepdims=True), **close)

    def attention(scale, causal):
        s = q @ k.transpose(0, 2, 1) * scale
        if causal:
            s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v

    np.testing.assert_allclose(out["att"], attention(1 / np.sqrt(8), False), **close)
    np.testing.assert_allclose(out["cau"], attention(0.5, True), **close)
    np.testing.assert_array_equal(out["ii"], ai.astype(np.int32) @ bi.astype(np.int32))


def test_memory_ops_match_numpy():
    big, idx, rows = f32(16, 4), np.array([3, 0, 15], np.int64), f32(3, 4)
    result = run(
        """
        .tensor big f32[16,4] input
        .tensor idx i64[3] input
        .tensor rows f32[3,4] input
        .tensor buf f32[4,4] output
        .tensor out f32[16,4] output
        .tensor got f32[3,4] output
        .tensor tmp f32[4,4] scratch
        S.load buf, big tile=2 rows=4
        S.alloc tmp
        D.add buf, buf, buf | S.prefetch big tile=3 rows=4
        S.store out, buf tile=1 rows=4
        S.gather got, big, idx
        S.scatter big, idx, rows
        S.store out, big tile=3 rows=4
        D.softmax tmp, buf
        S.free tmp | C.halt
        """,
        dict(big=big, idx=idx, rows=rows),
    )
    out = result.outputs
    np.testing.assert_array_equal(out["buf"], 2 * big[8:12])
    np.testing.assert_array_equal(out["got"], big[idx])
    expected = np.zeros((16, 4), np.float32)
    expected[4:8] = 2 * big[8:12]
    scattered = big.copy()
    scattered[idx] = rows
    expected[12:16] = scattered[0:4]  # store copies the source's first rows
    np.testing.assert_array_equal(out["out"], expected)
    assert "tmp" not in out


def test_initialisers_follow_the_documented_rules():
    out = run(
        """
        .tensor z f32[3] output
        .tensor o i32[3] ones output
        .tensor r f32[50] random(9) output
        .tensor r8 i8[50] random(9) output
        C.halt
        """
    ).outputs
    assert out["z"].tolist() == [0, 0, 0] and out["o"].tolist() == [1, 1, 1]
    spec = siw.TensorSpec("r", "f32", (50,), "random", 9)
    np.testing.assert_array_equal(out["r"], random_tensor(spec))
    assert -1 <= out["r"].min() and out["r"].max() < 1
    assert out["r8"].dtype == np.int8 and np.abs(out["r8"]).max() <= 127


def test_a_keeping_sentron_reuses_a_programs_tensors_but_starts_every_run_afresh():
    """keep=True (phextcc's modules): the tensors a run allocated stay for the next run of the
    same prepared program, initialised again (zeros, inputs), and go back to the arena when
    another program runs or the sentron closes."""
    first = siw.assemble(
        """
        .tensor x f32[2] input
        .tensor one f32[2] ones
        .tensor n f32[2] output
        .tensor y f32[2] output
        D.add n, n, one | C.loop 0 count=2
        D.add y, x, n
        C.halt
        """
    )
    other = siw.assemble(".tensor z f32[64] ones output\nC.halt")
    with Sentron(Arena(arena_bytes_for(first) + 4096), keep=True) as sentron:
        prepared = sentron.prepare(first)
        for x in ([1, 2], [10, 20], [5, 5]):
            out = sentron.run(prepared, {"x": np.array(x, np.float32)}).outputs
            assert out["n"].tolist() == [3, 3]  # zeros again at each run, not 6, 9
            assert out["y"].tolist() == [x[0] + 3, x[1] + 3]
        kept = sentron.arena.used
        assert kept > 0  # x's copy, one, n and y stay allocated between runs
        assert sentron.run(other).outputs["z"].tolist() == [1] * 64
        assert sentron.arena.used == 256  # the first program's tensors went back
        assert sentron.run(prepared, {"x": np.ones(2, np.float32)}).outputs["y"].tolist() == [4, 4]
        assert sentron.arena.used == kept
    assert sentron.arena.used == 0  # closing gives everything back
    with Sentron(Arena(arena_bytes_for(first) + 4096)) as plain:  # the default keeps nothing
        plain.run(first, {"x": np.ones(2, np.float32)})
        assert plain.arena.used == 0


def test_loop_jumps_back_count_times_so_the_body_runs_count_plus_one():
    result = run(
        """
        .tensor one f32[2] ones
        .tensor n f32[2] output
        .tensor m f32[2] output
        D.add n, n, one
        D.add m, m, one | C.loop 0 count=3
        C.halt
        """
    )
    assert result.outputs["n"].tolist() == [4, 4]
    assert result.loops_taken == 3 and result.words_issued == 9


def test_nested_loops_multiply_and_reenter_fresh():
    result = run(
        """
        .tensor one f32[1] ones
        .tensor inner f32[1] output
        .tensor outer f32[1] output
        D.add inner, inner, one | C.loop 0 count=2
        D.add outer, outer, one | C.loop 0 count=4
        C.halt
        """
    )
    assert result.outputs["outer"][0] == 5 and result.outputs["inner"][0] == 15
    assert result.loops_taken == 4 + 5 * 2


def test_halt_stops_before_later_words():
    result = run(
        ".tensor one f32[1] ones\n.tensor x f32[1] output\nC.halt\nD.add x, x, one | C.halt"
    )
    assert result.outputs["x"][0] == 0 and result.words_issued == 1


PROGRAM = """
.tensor x f32[2,3] input
.tensor y f32[2,3] output
D.softmax y, x | C.halt
"""


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input(s) x"),
        ({"x": np.zeros((3, 2), np.float32)}, "declares f32[2, 3]"),
        ({"x": np.zeros((2, 3), np.float64)}, "astype(np.float32)"),
        ({"x": np.zeros((2, 3), np.float32), "z": np.zeros(1)}, "unknown input(s) z"),
        ({"x": [[0, 0, 0], [0, 0, 0]]}, "must be a numpy array"),
    ],
)
def test_bad_inputs_are_refused_by_name(inputs, message):
    sentron = Sentron(Arena(4096))
    errors = COUNTERS.snapshot()["errors"]
    with pytest.raises(RunError) as info:
        sentron.run(PROGRAM, inputs)
    assert message in str(info.value)
    assert sentron.arena.used == 0
    assert sentron.counters.snapshot()["errors"] == 1
    assert COUNTERS.snapshot()["errors"] == errors + 1


def test_arena_too_small_is_refused_before_allocating():
    sentron = Sentron(Arena(1024))
    with pytest.raises(ArenaFull) as info:
        sentron.run(".tensor t f32[64,64]\nC.halt")
    assert "larger arena" in str(info.value)
    assert sentron.arena.peak == 0


def test_program_over_limits_is_refused_before_allocating():
    sentron = Sentron(Arena(1 << 20))
    with pytest.raises(ProgramError) as info:
        sentron.run(".tensor t f32[1000,1000]\nC.halt", limits=Limits(max_tensor_elements=1000))
    assert info.value.reason == "limits"
    assert sentron.arena.peak == 0


def test_scratch_misuse_is_a_run_error_naming_the_word():
    text = ".tensor t f32[4] scratch\n.tensor y f32[4] output\n"
    with pytest.raises(RunError, match="word 0.*not allocated"):
        run(text + "D.softmax y, t\nC.halt")
    with pytest.raises(RunError, match="already allocated") as info:
        run(text + "S.alloc t\nS.alloc t\nC.halt")
    assert info.value.index == 1


def test_scratch_alloc_beyond_the_arena_is_a_clear_error():
    program = siw.assemble(".tensor t f32[1024,1024] scratch\nS.alloc t\nC.halt")
    sentron = Sentron(Arena(1 << 16))
    with pytest.raises(RunError, match="word 0.*arena cannot fit"):
        sentron.run(program)
    assert sentron.arena.used == 0


def test_kernel_failure_names_the_word():
    text = """
    .tensor t f32[4,2] ones
    .tensor i i32[2] input
    .tensor y f32[2,2] output
    C.nop
    S.gather y, t, i | C.halt
    """
    with pytest.raises(RunError, match=r"word 1: S.gather y, t, i.*outside") as info:
        run(text, {"i": np.array([0, 9], np.int32)})
    assert info.value.index == 1


def test_run_accepts_bytes_and_text_and_counts_words():
    program = siw.assemble(PROGRAM)
    before = COUNTERS.snapshot()
    sentron = Sentron(Arena(4096))
    x = f32(2, 3)
    for form in (program, program.to_bytes(), program.to_text()):
        np.testing.assert_allclose(sentron.run(form, {"x": x}).outputs["y"].sum(1), 1, rtol=1e-5)
    after = COUNTERS.snapshot()
    assert after["siw_issued"] - before["siw_issued"] >= 3
    assert after["programs_run"] - before["programs_run"] >= 3
    own = sentron.counters.snapshot()
    assert own["siw_issued"] == 3 and own["programs_run"] == 3 and own["pipe_busy_ns"]["D"] > 0
    assert sentron.arena.used == 0


def test_run_parallel_matches_sequential_results_in_order():
    jobs = []
    for seed in range(5):
        m = 8 + seed
        text = f".tensor x f32[{m},16] input\n.tensor w f32[16,8] random({seed})\n"
        text += f".tensor y f32[{m},8] output\nD.linear y, x, w act=relu | C.halt"
        jobs.append((siw.assemble(text), {"x": f32(m, 16)}))
    parallel = run_parallel(jobs, n_sentrons=2)
    for (program, inputs), result in zip(jobs, parallel, strict=True):
        sequential = Sentron(Arena(arena_bytes_for(program))).run(program, inputs)
        np.testing.assert_array_equal(result.outputs["y"], sequential.outputs["y"])
    assert {r.sentron_id for r in parallel} == {0, 1}


def test_run_parallel_reports_which_program_failed():
    good = (siw.assemble(PROGRAM), {"x": f32(2, 3)})
    with pytest.raises(RunError, match="program 1 failed"):
        run_parallel([good, (good[0], {})], n_sentrons=2)


def test_tiled_gemm_computes_the_product():
    program = tiled_gemm_program(8, 64, 16, 16)
    inputs, expected = tiled_gemm_inputs(8, 64, 16, 16)
    for overlap in (True, False):
        with Sentron(Arena(arena_bytes_for(program)), overlap=overlap) as sentron:
            result = sentron.run(program, inputs)
        np.testing.assert_allclose(result.outputs["c"], expected, rtol=1e-4, atol=1e-3)
        assert result.ops == 2 * 8 * 64 * 16


def test_overlap_runs_s_and_d_intervals_at_the_same_time():
    m, k, n, tile = 64, 4096, 256, 512
    program = tiled_gemm_program(m, k, n, tile)
    inputs, _ = tiled_gemm_inputs(m, k, n, tile)
    with Sentron(Arena(arena_bytes_for(program)), overlap=True) as sentron:
        for _ in range(3):  # a busy machine may delay the S thread's wake-up on one run
            intervals = sentron.run(program, inputs, validate=False, trace=True).intervals
            d = {word: (t0, t1) for pipe, word, t0, t1 in intervals if pipe == "D"}
            s = {word: (t0, t1) for pipe, word, t0, t1 in intervals if pipe == "S"}
            overlapping = [
                w for w in d.keys() & s.keys() if d[w][0] < s[w][1] and s[w][0] < d[w][1]
            ]
            if overlapping:
                break
    assert overlapping, "no word ran its D and S slots at the same time"

    with Sentron(Arena(arena_bytes_for(program)), overlap=False) as sentron:
        intervals = sentron.run(program, inputs, validate=False, trace=True).intervals
    spans = sorted((t0, t1) for _, _, t0, t1 in intervals)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_arena_aligns_coalesces_and_tracks_peak():
    arena = Arena(1024)
    a = arena.tensor((10,), np.float32)
    b = arena.tensor((3, 5), np.float32)
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
    assert arena.used == 128 and arena.peak == 128
    arena.release(a)
    arena.release(b)
    assert arena.used == 0 and arena.peak == 128
    whole = arena.tensor((256,), np.float32)  # fits only if the two blocks coalesced
    assert whole.nbytes == 1024
    with pytest.raises(ArenaFull, match="cannot fit 64 bytes"):
        arena.tensor((1,), np.float32)
    with pytest.raises(ValueError, match="not a live allocation"):
        arena.free(64)


def test_cancel_stops_a_long_run_between_words_and_the_sentron_stays_usable():
    long_loop = """
        .tensor one f32[4] ones
        .tensor n f32[4] output
        D.add n, n, one | C.loop 0 count=5000000
        C.halt
        """
    with Sentron(Arena(1 << 20)) as sentron:
        timer = threading.Timer(0.2, sentron.cancel)
        timer.start()
        started = time.perf_counter()
        with pytest.raises(RunCancelled, match="run cancelled") as caught:
            sentron.run(long_loop)
        assert time.perf_counter() - started < 5
        assert caught.value.index == 0
        # The next run starts afresh: a cancel applies to the run it was meant for.
        result = sentron.run(
            ".tensor one f32[2] ones\n.tensor n f32[2] output\nD.add n, n, one | C.halt"
        )
        assert result.outputs["n"].tolist() == [1, 1]


def test_a_cancel_meant_for_a_finished_run_never_stops_the_next_run():
    program = ".tensor one f32[2] ones\n.tensor n f32[2] output\nD.add n, n, one | C.halt"
    with Sentron(Arena(1 << 20)) as sentron:
        first = threading.Event()
        sentron.run(program, cancel=first)
        first.set()  # a deadline that fires just after its run ended
        sentron.cancel()  # idle: a no-op, not a flag left for the next run
        assert sentron.run(program).outputs["n"].tolist() == [1, 1]


def test_a_runs_own_cancel_event_stops_it_and_only_it():
    long_loop = """
        .tensor one f32[4] ones
        .tensor n f32[4] output
        D.add n, n, one | C.loop 0 count=5000000
        C.halt
        """
    short = ".tensor one f32[2] ones\n.tensor n f32[2] output\nD.add n, n, one | C.halt"
    with Sentron(Arena(1 << 20)) as sentron:
        event = threading.Event()
        threading.Timer(0.2, event.set).start()
        with pytest.raises(RunCancelled):
            sentron.run(long_loop, cancel=event)
        # The same (still set) event belongs to the old run; a new run has its own.
        assert sentron.run(short).outputs["n"].tolist() == [1, 1]


def test_written_first_finds_the_tensors_a_program_overwrites_whole_before_reading():
    """siw.written_first: only a first touch that writes every element (the tensor, or a view
    covering it exactly, by a full-write D op or S.gather) with nothing read in that word."""
    program = siw.assemble(
        """
        .tensor x f32[4,4] input
        .tensor x2 f32[2,4] input
        .tensor g f32[4] input
        .tensor tab f32[16,4] input
        .tensor i i64[4] input
        .tensor whole f32[4,4] output
        .tensor flat f32[16]
        .tensor flat2 f32[4,4] view(flat,0,4,1)
        .tensor half f32[16]
        .tensor half2 f32[2,4] view(half,0,4,1)
        .tensor inplace f32[4,4]
        .tensor summed f32[4,4]
        .tensor loaded f32[4,4]
        .tensor gathered f32[4,4]
        .tensor looped f32[4,4]
        .tensor never f32[4] output
        D.add whole, x, x
        D.add flat2, x, x
        D.add half2, x2, x2
        D.layernorm inplace, inplace, g, g
        D.gemm summed, x, x acc
        S.load loaded, x tile=0 rows=4
        D.add looped, looped, x
        D.add looped, x, x | C.loop 1 count=2
        S.gather gathered, tab, i | C.halt
        """
    )
    names = {program.tensors[t].name for t in siw.written_first(program)}
    # not: half (its view covers 8 of 16), inplace (read in the word that writes it), summed
    # (acc reads it), loaded (S.load is no full write), looped (read by the loop body's first
    # word), never (not written)
    assert names == {"whole", "flat", "gathered"}


def test_a_run_skips_initialising_what_is_written_first_and_still_reads_zeros_elsewhere():
    """Skipping the zero fill is unobservable: on an arena left full of another program's
    values, a written-first tensor holds this run's results and a tensor read before it is
    written (or never written) still starts at zeros, so no run sees another's data."""
    secret = siw.assemble(
        """
        .tensor s f32[64] input
        .tensor a f32[64] output
        D.add a, s, s | C.halt
        """
    )
    reader = siw.assemble(
        """
        .tensor x f32[8] input
        .tensor w f32[8]
        .tensor total f32[8] output
        .tensor untouched f32[16] output
        D.add w, x, x
        D.add total, total, w | C.halt
        """
    )
    with Sentron(Arena(arena_bytes_for(secret) + 4096), keep=True) as sentron:
        for _ in range(2):
            sentron.run(secret, {"s": np.full(64, 7.0, np.float32)})
            prepared = sentron.prepare(reader)
            names = {reader.tensors[t].name for t in prepared.written_first}
            assert names == {"w"}
            for x in (np.arange(8, dtype=np.float32), np.ones(8, np.float32)):
                out = sentron.run(prepared, {"x": x}).outputs
                assert out["total"].tolist() == (2 * x).tolist()  # from 0 at each run
                assert out["untouched"].tolist() == [0.0] * 16


def test_what_is_written_first_does_not_depend_on_what_the_arena_held():
    """Every full-write op (siw._D_FULL_WRITE but MATMUL, which reads packed weights) gives the
    same bits on an arena left full of NaN as on a fresh one: none reads its dst first."""
    x, w, b, g = f32(8, 16), f32(16, 32), f32(32), f32(32)
    qkv, gb = f32(2, 4, 24), f32(2, 32)
    inputs = dict(x=x, w=w, b=b, g=g, qkv=qkv, gb=gb, lengths=np.array([4, 2], np.int32))
    text = """
        .tensor x f32[8,16] input
        .tensor w f32[16,32] input
        .tensor b f32[32] input
        .tensor g f32[32] input
        .tensor gb f32[2,32] input
        .tensor qkv f32[2,4,24] input
        .tensor lengths i32[2] input
        .tensor mm f32[8,32] output
        .tensor lin f32[8,32] output
        .tensor sum f32[8,32] output
        .tensor prod f32[8,32] output
        .tensor ln f32[8,32] output
        .tensor rms f32[8,32] output
        .tensor sm f32[8,32] output
        .tensor aln f32[8,32] output
        .tensor ge f32[8,32] output
        .tensor l2 f32[8,32] output
        .tensor ctx f32[2,4,8] output
        .tensor pool f32[2,8] output
        D.gemm mm, x, w
        D.linear lin, x, w, b act=gelu
        D.add sum, mm, lin
        D.mul prod, mm, b
        D.layernorm ln, mm, g, b
        D.rmsnorm rms, mm, g
        D.softmax sm, mm
        D.add_layernorm aln, mm, lin, gb
        D.gelu ge, mm
        D.l2norm l2, mm
        D.attn_qkv ctx, qkv, lengths heads=2
        D.mean_pool pool, ctx, lengths | C.halt
        """
    program = siw.assemble(text)
    outputs = {t.name for t in program.tensors if t.output}
    assert {program.tensors[t].name for t in siw.written_first(program)} == outputs
    with Sentron(Arena(arena_bytes_for(program))) as fresh:
        expected = fresh.run(program, inputs).outputs
    with Sentron(Arena(arena_bytes_for(program))) as dirty:
        dirty.arena.buffer.view(np.float32)[:] = np.nan
        got = dirty.run(program, inputs).outputs
    for name in outputs:
        assert np.isfinite(got[name]).all(), name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
