"""SIW: the encoding round-trips through text and bytes, and bad programs are refused by name."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtpu import siw
from vtpu.siw import Limits, ProgramError

TENSORS = """
.tensor x f32[8,16] input
.tensor w f32[16,32] random(7)
.tensor b f32[32]
.tensor y f32[8,32] output
.tensor big f32[256,32] random(3)
.tensor buf f32[64,32]
"""


def program(words: str, tensors: str = TENSORS) -> siw.Program:
    return siw.assemble(tensors + words)


def rejected(words: str, tensors: str = TENSORS, limits: Limits = siw.DEFAULT_LIMITS):
    with pytest.raises(ProgramError) as info:
        siw.assemble(tensors + words, limits)
    return info.value


def test_word_is_64_bytes_and_words_start_64_byte_aligned():
    assert siw.SIW_DTYPE.itemsize == 64
    data = program(
        "D.linear y, x, w, b act=gelu | S.load buf, big tile=1 rows=64\nC.halt"
    ).to_bytes()
    header = struct.unpack_from("<4sHHII", data)
    assert header[0] == b"SIW1" and header[3] == 2
    assert header[4] % 64 == 0 and len(data) == header[4] + 2 * 64


def test_fields_land_at_documented_offsets():
    p = program(
        "C.nop\nD.linear y, x, w, b act=gelu | S.load buf, big tile=1 rows=64 | C.loop 0 count=3"
        " deps=S<D\nC.halt"
    )
    word = p.to_bytes()[-128:-64]
    assert word[0] == 1  # format
    assert word[1] == 16  # deps: S<D is bit 4
    assert word[4] == siw.DOp.LINEAR and word[5] == 2  # gelu
    assert struct.unpack_from("<4H", word, 6) == (3, 0, 1, 2)  # y, x, w, b
    assert word[20] == siw.SOp.LOAD
    assert struct.unpack_from("<5H", word, 22) == (5, 4, 0, 1, 64)
    assert word[36] == siw.COp.LOOP and struct.unpack_from("<HI", word, 38) == (0, 3)
    assert word[44:64] == bytes(20)


def test_example_text_round_trips_canonically():
    text = program(
        "D.linear y, x, w, b act=gelu | S.prefetch w tile=1 rows=8 deps=D<S\n"
        "D.layernorm y, y, b, b eps=0.001\nnop\nC.halt  # done\n"
    ).to_text()
    assert siw.disassemble(siw.assemble(text).to_bytes()) == text
    assert "S.prefetch w tile=1 rows=8 deps=D<S" in text
    assert "eps=0.001" in text


# ---- property tests: random valid programs --------------------------------------------------


@st.composite
def programs(draw) -> siw.Program:
    m, k, n = (draw(st.integers(1, 6)) for _ in range(3))
    h, s, d = (draw(st.integers(1, 4)) for _ in range(3))
    rows = draw(st.integers(1, 4))
    init = st.sampled_from(["zeros", "ones", "input", "random"])

    def spec(name, dtype, shape):
        kind = draw(init)
        seed = draw(st.integers(0, 2**64 - 1)) if kind == "random" else 0
        return siw.TensorSpec(name, dtype, shape, kind, seed, draw(st.booleans()))

    tensors = [
        spec("a", "f32", (m, k)), spec("bm", "f32", (k, n)), spec("c", "f32", (m, n)),
        spec("bias", "f32", (n,)), spec("e", "f32", (m, n)), spec("q", "f32", (h, s, d)),
        spec("o", "f32", (h, s, d)), spec("ai", "i8", (m, k)), spec("bi", "i8", (k, n)),
        spec("ci", "i32", (m, n)), spec("big", "f32", (rows * 4, n)),
        spec("buf", "f32", (rows, n)), spec("idx", "i64", (3,)), spec("g", "f32", (3, n)),
        siw.TensorSpec("tmp", "f32", (rows, n), "scratch"),
    ]  # fmt: skip
    t = {x.name: i for i, x in enumerate(tensors)}
    f32 = st.floats(2.0**-20, 1e3, width=32)
    d_slots = [
        None, ("GEMM", "c", "a", "bm"), ("LINEAR", "e", "a", "bm", "bias"),
        ("LINEAR", "e", "a", "bm"), ("ADD", "c", "c", "e"), ("MUL", "e", "c", "bias"),
        ("LAYERNORM", "c", "e", "bias", "bias"), ("RMSNORM", "e", "c", "bias"),
        ("SOFTMAX", "c", "c"), ("ATTENTION", "o", "q", "q", "q"), ("GEMM_I8", "ci", "ai", "bi"),
    ]  # fmt: skip
    s_slots = [
        None, ("LOAD", "buf", "big"), ("STORE", "big", "buf"), ("PREFETCH", "big"),
        ("GATHER", "g", "big", "idx"), ("SCATTER", "big", "idx", "g"), ("ALLOC", "tmp"),
        ("FREE", "tmp"),
    ]  # fmt: skip
    n_words = draw(st.integers(1, 12))
    words = siw.empty_words(n_words)
    for i in range(n_words):
        w = words[i]
        d_slot, s_slot = draw(st.sampled_from(d_slots)), draw(st.sampled_from(s_slots))
        if d_slot:
            op = siw.DOp[d_slot[0]]
            w["d_op"] = op
            for field, name in zip(siw._D_OPERANDS[op], d_slot[1:], strict=False):
                w[field] = t[name]
            if op == siw.DOp.LINEAR:
                w["d_flags"] = draw(st.integers(0, 3))
                if len(d_slot) == 4:
                    w["d_c"] = siw.NONE
            if op == siw.DOp.ATTENTION:
                w["d_flags"] = draw(st.sampled_from([0, siw.FLAG_CAUSAL]))
            if op == siw.DOp.GEMM:
                w["d_flags"] = draw(st.sampled_from([0, siw.FLAG_ACC]))
            if op in siw._D_IMM and draw(st.booleans()):
                w["d_imm"] = int(np.float32(draw(f32)).view(np.uint32))
        if s_slot:
            op = siw.SOp[s_slot[0]]
            w["s_op"] = op
            for field, name in zip(siw._S_OPERANDS[op], s_slot[1:], strict=True):
                w[field] = t[name]
            if op in siw._S_TILED:
                w["s_rows"] = rows
                w["s_tile"] = draw(st.integers(0, 3)) if op != siw.SOp.STORE else 3
        deps = 0
        if d_slot and s_slot:
            deps |= draw(st.sampled_from([0, siw.DEP_D_NEEDS_S, siw.DEP_S_NEEDS_D]))
        w["deps"] = deps
        if i < n_words - 1 and draw(st.integers(0, 3)) == 0:
            w["c_op"] = siw.COp.LOOP
            w["c_target"] = draw(st.integers(0, i))
            w["c_count"] = draw(st.integers(0, 3))
        elif i < n_words - 1:
            w["c_op"] = draw(st.sampled_from([0, 4]))
    words["c_op"][-1] = siw.COp.HALT
    p = siw.Program(tensors, words)
    try:
        siw.validate(p)
    except ProgramError as err:  # a random draw can race or cross loops: try another
        from hypothesis import reject

        assert err.reason in ("data race", "cyclic dependency", "bad loop"), err
        reject()
    return p


fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(programs())
def test_bytes_to_text_to_bytes_is_identical(p):
    data = p.to_bytes()
    assert siw.assemble(siw.disassemble(data)).to_bytes() == data


@fast
@given(programs())
def test_canonical_text_to_bytes_to_text_is_identical(p):
    text = p.to_text()
    assert siw.disassemble(siw.assemble(text).to_bytes()) == text


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_decode_to_a_program_or_a_program_error(data):
    try:
        siw.decode(data)
    except ProgramError:
        pass


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.data())
def test_mutated_valid_programs_decode_or_fail_cleanly(p, data):
    raw = bytearray(p.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        siw.decode(bytes(raw))
    except ProgramError as err:
        assert err.reason and str(err)


# ---- validation: each reason, with the offending word ---------------------------------------

GOOD = "D.gemm y, x, w | S.load buf, big tile=1 rows=64\nC.halt"


def with_bytes(mutate) -> ProgramError:
    raw = bytearray(program(GOOD).to_bytes())
    mutate(raw, len(raw) - 128)  # offset of word 0
    with pytest.raises(ProgramError) as info:
        siw.decode(bytes(raw))
    return info.value


def test_bad_magic_and_version_and_truncation_are_header_errors():
    data = program(GOOD).to_bytes()
    for bad, reason in (
        (b"XIW1" + data[4:], "bad magic"),
        (data[:4] + b"\x09\x00" + data[6:], "bad version"),
        (data[:-1], "truncated"),
        (data[:10], "truncated"),
    ):
        with pytest.raises(ProgramError) as info:
            siw.decode(bad)
        assert info.value.reason == reason and info.value.index is None
        assert "program header" in str(info.value)


def test_bad_opcode_names_the_word():
    err = with_bytes(lambda raw, w: raw.__setitem__(w + 4, 200))
    assert (err.reason, err.index) == ("bad opcode", 0)
    assert str(err).startswith("word 0: bad opcode")


def test_nonzero_reserved_bytes_are_rejected():
    for offset in (2, 18, 33, 62, 21):
        err = with_bytes(lambda raw, w, o=offset: raw.__setitem__(w + o, 1))
        assert (err.reason, err.index) == ("reserved bytes", 0)


def test_unknown_tensor_id_is_a_bad_operand():
    err = with_bytes(lambda raw, w: struct.pack_into("<H", raw, w + 8, 99))
    assert (err.reason, err.index) == ("bad operand", 0) and "99" in str(err)


def test_removed_features_are_refused_with_the_reason():
    # the word's phext address, BARRIER/SYNC and the cross-word dependency bits did nothing
    err = rejected("C.nop @1.1.1/1.1.1/1.1.2\nC.halt")
    assert (err.reason, err.index) == ("syntax", 0) and "phext address was removed" in str(err)
    for op in ("barrier", "sync"):
        err = rejected(f"C.nop\nC.{op}\nC.halt")
        assert (err.reason, err.index) == ("bad opcode", 1) and "removed" in str(err)
    for dep in ("D>D", "S>S", "C>C", "C<D"):
        err = rejected(f"C.nop\nD.gemm y, x, w deps={dep}\nC.halt")
        assert (err.reason, err.index) == ("syntax", 1) and "removed" in str(err)
    # and in binary: the bytes are reserved, the opcodes refused
    for offset, value, reason in ((44, 1, "reserved bytes"), (1, 1, "reserved bytes"),
                                  (1, 32, "reserved bytes"), (36, 1, "bad opcode"),
                                  (36, 2, "bad opcode")):  # fmt: skip
        err = with_bytes(lambda raw, w, o=offset, v=value: raw.__setitem__(w + o, v))
        assert err.reason == reason and "removed" in str(err), err


@pytest.mark.parametrize(
    ("words", "reason", "index"),
    [
        ("D.gemm y, w, x\nC.halt", "shape mismatch", 0),
        ("C.nop\nD.linear y, x, w, x\nC.halt", "shape mismatch", 1),
        ("D.add y, y, x\nC.halt", "shape mismatch", 0),
        ("D.attention y, x, x, x\nC.halt", "shape mismatch", 0),
        ("D.gemm_i8 y, x, w\nC.halt", "wrong dtype", 0),
        ("D.gemm x, x, w\nC.halt", "shape mismatch", 0),
        ("S.load buf, big tile=4 rows=64\nC.halt", "out of range", 0),
        ("S.store big, buf tile=3 rows=65\nC.halt", "out of range", 0),
        ("S.load buf, x tile=0 rows=8\nC.halt", "shape mismatch", 0),
        ("S.alloc y\nC.halt", "bad operand", 0),
        ("D.gemm y, x, w", "missing halt", 0),
        ("C.halt\nC.nop", "missing halt", 1),
        ("C.loop 1 count=2\nC.halt", "bad loop", 0),
        ("C.nop\nC.loop 0 count=1\nC.loop 1 count=1\nC.halt", "bad loop", 2),
        ("D.gemm y, x, w | S.load buf, big tile=0 rows=8 deps=D<S,S<D\nC.halt",
         "cyclic dependency", 0),
        ("D.gemm y, x, w deps=D<S\nC.halt", "cyclic dependency", 0),
        ("D.gemm y, x, w deps=D>D\nC.halt", "syntax", 0),
        ("D.softmax buf, buf | S.load buf, big tile=0 rows=8\nC.halt", "data race", 0),
        ("D.gemm y, x, w\nD.linear y, x, w, b act=tanh\nC.halt", "syntax", 1),
        ("D.frob y\nC.halt", "bad opcode", 0),
        ("D.gemm y, x, nothere\nC.halt", "bad operand", 0),
    ],
)  # fmt: skip
def test_invalid_program_is_rejected_with_reason_and_word(words, reason, index):
    err = rejected(words)
    assert (err.reason, err.index) == (reason, index), str(err)
    assert f"word {index}" in str(err) and reason in str(err)


def test_two_way_hazard_without_bits_is_a_cyclic_dependency():
    tensors = TENSORS + ".tensor y2 f32[64,32]\n"
    # D reads buf and writes big's twin... S writes buf and reads y2, which D writes.
    err = rejected("D.softmax y2, buf | S.load buf, y2 tile=0 rows=64\nC.halt", tensors)
    assert (err.reason, err.index) == ("cyclic dependency", 0)
    assert "no issue order" in str(err)


def test_one_way_hazard_infers_the_issue_order():
    p = program("D.gemm y, x, w | S.load buf, big tile=0 rows=8\nC.halt")
    assert siw.issue_order(p, 0) == siw.ORDER_PARALLEL
    p = program("D.softmax buf, buf | S.prefetch buf tile=0 rows=8 deps=S<D\nC.halt")
    assert siw.issue_order(p, 0) == siw.ORDER_D_FIRST


def test_limits_reject_before_anything_is_allocated():
    huge = ".tensor t f32[100000,100000]\n"
    err = rejected("C.halt", huge)
    assert err.reason == "limits" and err.index is None and "elements" in str(err)
    many = "C.nop\n" * 10 + "C.halt"
    assert rejected(many, limits=Limits(max_words=5)).reason == "limits"
    loops = "C.nop\nC.loop 0 count=1000\nC.loop 0 count=1000\nC.halt"
    err = rejected(loops, limits=Limits(max_loop_iterations=100_000))
    assert err.reason == "limits"
    total = ".tensor a f32[1000,1000]\n.tensor b f32[1000,1000]\n"
    assert rejected("C.halt", total, Limits(max_total_elements=1_500_000)).reason == "limits"


def test_nested_loops_count_back_jumps_multiplied():
    ok = "C.nop\nC.loop 0 count=9\nC.loop 0 count=9\nC.halt"
    siw.assemble(ok, Limits(max_loop_iterations=9 + 9 * 10))
    with pytest.raises(ProgramError):
        siw.assemble(ok, Limits(max_loop_iterations=9 + 9 * 10 - 1))


def test_bad_tensor_declarations_are_header_errors():
    for decl in (
        ".tensor 9x f32[2]\n",
        ".tensor x f32[2]\n.tensor x f32[3]\n",
        ".tensor x f32[0]\n",
        ".tensor causal f32[2]\n",
    ):
        err = rejected("C.halt", decl)
        assert err.index is None and err.reason == "bad tensor", str(err)
    with pytest.raises(ProgramError) as info:
        siw.assemble(".tensor x f99[2]\nC.halt")
    assert info.value.reason == "syntax" and "line 1" in str(info.value)
