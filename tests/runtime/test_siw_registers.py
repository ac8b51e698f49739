"""Loop registers: a C.loop drives a register with its pass's index and register-relative
views walk memory with it. Encoded, assembled and disassembled alike; refused with the reason
(a 4xx at the agent) where a pass could read outside its base or no loop drives the register;
run, a looped program gives what the same program unrolled gives."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.test_agent import agent, call_json  # noqa: F401 - the agent fixture
from vtpu import siw
from vtpu.arena import Arena
from vtpu.sentron import RunError, Sentron, arena_bytes_for
from vtpu.siw import ProgramError

rng = np.random.default_rng(11)

# y = sum over the 4 layers of x @ w[layer]: one body, the layer's weights a view walking w.
WALK = """
.tensor w f32[4,3,5] resident
.tensor x f32[2,3] input
.tensor wl f32[3,5] view(w,0+r1*15,5,1)
.tensor y f32[2,5]
.tensor total f32[2,5] output
D.gemm y, x, wl
D.add total, total, y | C.loop 0 count=3 reg=r1
C.halt
"""


def unrolled(layers: int) -> str:
    lines = [".tensor w f32[4,3,5] resident", ".tensor x f32[2,3] input"]
    lines += [f".tensor w{k} f32[3,5] view(w,{15 * k},5,1)" for k in range(layers)]
    lines += [".tensor y f32[2,5]", ".tensor total f32[2,5] output"]
    for k in range(layers):
        lines += [f"D.gemm y, x, w{k}", "D.add total, total, y"]
    return "\n".join(lines) + " | C.halt\n"


def run(program, inputs=None, resident=None, runs: int = 1):
    program = siw.assemble(program) if isinstance(program, str) else program
    with Sentron(Arena(arena_bytes_for(program) + 4096)) as sentron:
        prepared = sentron.prepare(program, resident or {})
        return [sentron.run(prepared, inputs or {}) for _ in range(runs)]


def refused(text: str, reason: str, *fragments: str, word: int | None = None) -> ProgramError:
    with pytest.raises(ProgramError) as info:
        siw.assemble(text)
    assert info.value.reason == reason, info.value
    for fragment in fragments:
        assert fragment in str(info.value), info.value
    if word is not None:
        assert info.value.index == word
    return info.value


def test_registers_round_trip_through_binary_and_text() -> None:
    program = siw.assemble(WALK)
    view = program.tensors[2]
    assert (view.reg, view.step, view.offset) == (1, 15, 0)
    loop_word = program.words[1]
    assert loop_word["c_flags"] == siw.LOOP_REG | 1 and loop_word["c_count"] == 3
    data = siw.encode(program)
    back = siw.decode(data)
    assert back.tensors == program.tensors
    assert siw.encode(back) == data
    text = siw.to_text(back)
    assert "view(w,0+r1*15,5,1)" in text and "C.loop 0 count=3 reg=r1" in text
    assert siw.encode(siw.assemble(text)) == data


def test_a_program_without_registers_encodes_as_it_always_did() -> None:
    text = unrolled(2)
    data = siw.encode(siw.assemble(text))
    # container version 1; no view flagged register-relative, no register byte set
    assert data[4:6] == (1).to_bytes(2, "little")
    program = siw.decode(data)
    assert all(t.reg is None and t.step == 0 for t in program.tensors)
    assert (program.words["c_flags"] == 0).all()


def test_a_looped_walk_equals_the_unrolled_program_bit_for_bit() -> None:
    w, x = rng.standard_normal((4, 3, 5), np.float32), rng.standard_normal((2, 3), np.float32)
    looped = run(WALK, {"x": x}, {"w": w}, runs=2)
    (flat,) = run(unrolled(4), {"x": x}, {"w": w})
    for result in looped:  # the second run starts from r1 = 0 again
        np.testing.assert_array_equal(result.outputs["total"], flat.outputs["total"])
        assert result.loops_taken == 3
    np.testing.assert_allclose(flat.outputs["total"], sum(x @ w[k] for k in range(4)), rtol=1e-5)


def test_arena_tensors_walk_too_and_a_strided_view_moves_by_its_step() -> None:
    # Each pass copies column k of m (a strided register view) into row k of out (a dense one).
    m = rng.standard_normal((3, 4), np.float32)
    (result,) = run(
        """
        .tensor m f32[3,4] input
        .tensor col f32[3,1] view(m,0+r2*1,4,1)
        .tensor t f32[3,1]
        .tensor t_row f32[1,3] view(t,0,3,1)
        .tensor out f32[4,3] output
        .tensor row f32[1,3] view(out,0+r2*3,3,1)
        S.load t, col tile=0 rows=3
        D.add row, row, t_row | C.loop 0 count=3 reg=r2
        C.halt
        """,
        {"m": m},
    )
    np.testing.assert_array_equal(result.outputs["out"], m.T)


def test_nested_loops_fill_every_cell_of_an_outer_sum() -> None:
    a, b = rng.standard_normal((3, 4), np.float32), rng.standard_normal((2, 4), np.float32)
    # out is (3*2, 4) seen as rows: row i*2 + j. One view per register cannot add both
    # indices, so the inner loop writes a scratch row (r1) and the outer pass stores it (r0).
    (result,) = run(
        """
        .tensor a f32[3,4] input
        .tensor b f32[2,4] input
        .tensor pair f32[2,4]
        .tensor out f32[3,8] output
        .tensor ai f32[4] view(a,0+r0*4,1)
        .tensor bj f32[4] view(b,0+r1*4,1)
        .tensor pj f32[4] view(pair,0+r1*4,1)
        .tensor pflat f32[1,8] view(pair,0,8,1)
        .tensor orow f32[1,8] view(out,0+r0*8,8,1)
        D.add pj, ai, bj | C.loop 0 count=1 reg=r1
        S.store orow, pflat tile=0 rows=1 | C.loop 0 count=2 reg=r0
        C.halt
        """,
        {"a": a, "b": b},
    )
    want = (a[:, None, :] + b[None, :, :]).reshape(3, 8)
    np.testing.assert_array_equal(result.outputs["out"], want)
    assert result.loops_taken == 3 * 1 + 2  # inner: 1 back-jump per outer pass; outer: 2


# ---- refusals ----------------------------------------------------------------------------------


def test_a_register_view_outside_its_loop_is_refused() -> None:
    refused(WALK.replace("D.gemm y, x, wl\n", "D.gemm y, x, wl\nD.gemm y, x, wl\n").replace(
        "C.loop 0", "C.loop 1"), "bad register", "no loop that drives r1", word=0)  # fmt: skip
    refused(WALK.replace("reg=r1", "reg=r2"), "bad register", "r1", word=0)
    refused(WALK.replace(" reg=r1", ""), "bad register", word=0)


def test_a_pass_reaching_outside_the_base_is_refused_statically() -> None:
    error = refused(WALK.replace("count=3", "count=4"), "out of range", word=0)
    assert "r1 = 4" in str(error) and "element 74" in str(error)
    # the view at r = 0 is checked with the table, like any view
    refused(WALK.replace("0+r1*15", "50+r1*15"), "out of range", "element 64")


def test_out_of_range_registers_are_refused_in_text_and_binary() -> None:
    refused(WALK.replace("reg=r1", "reg=r8"), "bad register", "r0..r7")
    refused(WALK.replace("reg=r1", "reg=x1"), "bad register")
    refused(WALK.replace("0+r1*15", "0+r9*15"), "bad register", "r0..r7")
    data = bytearray(siw.encode(siw.assemble(WALK)))
    # the view's register byte (entry byte 7) set to 9 in the binary
    program = siw.assemble(WALK)
    table_start = 16
    pos = table_start
    for t in program.tensors[:2]:
        pos += 16 + 4 * len(t.shape) + len(t.name) + (2 + 4 * len(t.shape) if t.init == "view"
                                                      else 0)  # fmt: skip
    assert data[pos + 7] == 1
    data[pos + 7] = 9
    with pytest.raises(ProgramError, match="bad register"):
        siw.decode(bytes(data))
    # C flags: a register number without bit 3, or bits above it, are reserved
    words_at = len(data) - 64 * len(program.words)
    for flags in (0x01, 0x10):
        bad = bytearray(siw.encode(program))
        bad[words_at + 64 + 37] = flags
        with pytest.raises(ProgramError, match="reserved"):
            siw.decode(bytes(bad))


def test_nested_loops_on_one_register_are_refused() -> None:
    text = """
    .tensor a f32[4] ones
    .tensor y f32[4] output
    D.add y, y, a | C.loop 0 count=1 reg=r3
    C.loop 0 count=1 reg=r3
    C.halt
    """
    refused(text, "bad loop", "loop 0..0 drives r3", "loop 0..1 around it", word=0)
    # one after the other they may share it: each falls through to 0
    siw.assemble(
        text.replace("C.loop 0 count=1 reg=r3\n    C.halt", "C.loop 1 count=1 reg=r3\n    C.halt")
    )


def test_register_views_of_scratch_or_non_views_are_refused() -> None:
    refused(
        """
        .tensor s f32[4,4] scratch
        .tensor v f32[4] view(s,0+r0*4,1)
        C.halt
        """,
        "bad tensor", "scratch",
    )  # fmt: skip
    program = siw.assemble(".tensor a f32[4]\nC.halt\n")
    program.tensors[0] = siw.TensorSpec("a", "f32", (4,), reg=0, step=1)
    with pytest.raises(ProgramError, match="only for a view"):
        siw.validate(program)


def test_races_are_judged_on_the_whole_base_every_pass_aliases() -> None:
    # D writes row r0 of w while S writes row 3: on some pass they meet, so it is a race
    # whatever the register holds.
    refused(
        """
        .tensor w f32[4,4]
        .tensor src f32[1,4] ones
        .tensor row f32[4] view(w,0+r0*4,1)
        .tensor y f32[4] output
        D.add row, y, y | S.store w, src tile=3 rows=1 | C.loop 0 count=3 reg=r0
        C.halt
        """,
        "data race", "'w'",
    )  # fmt: skip


def test_the_agent_answers_a_bad_register_with_400(agent) -> None:  # noqa: F811
    status, doc = call_json(
        agent, "POST", "/vTPU/programs", WALK.replace("count=3", "count=9").replace(
            " resident", " ones"), content_type="text/plain",
    )  # fmt: skip
    assert status == 400, doc
    assert doc["reason"] == "out of range" and doc["word"] == 0


def test_a_run_that_fails_inside_the_loop_leaves_the_next_run_at_register_zero() -> None:
    # Pass k looks up ids[k] in table k of a resident stack: a run that fails on its second
    # pass must not leave the next run's first pass reading table 1.
    program = siw.assemble(
        """
        .tensor tables f32[2,4,3] resident
        .tensor ids i64[2] input
        .tensor table f32[4,3] view(tables,0+r0*12,3,1)
        .tensor id i64[1] view(ids,0+r0*1,1)
        .tensor out f32[2,3] output
        .tensor row f32[1,3] view(out,0+r0*3,3,1)
        D.rows row, table, id | C.loop 0 count=1 reg=r0
        C.halt
        """
    )
    tables = rng.standard_normal((2, 4, 3), np.float32)
    with Sentron(Arena(arena_bytes_for(program) + 4096)) as sentron:
        prepared = sentron.prepare(program, {"tables": tables})
        with pytest.raises(RunError, match="word 0"):  # the second pass reads row 9
            sentron.run(prepared, {"ids": np.array([0, 9])})
        result = sentron.run(prepared, {"ids": np.array([2, 1])})
    np.testing.assert_array_equal(result.outputs["out"], [tables[0, 2], tables[1, 1]])
