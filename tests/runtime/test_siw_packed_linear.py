"""SIW's packed Linear weights (siw: "Packed Linear weights"): a reduced-precision encoder's
bf16lin / int8lin / int8dyn weights, resident as the kernels' packed objects, read by D.linear
through the kernel the hand-written forward calls (bit for bit), stacked per layer behind a
loop register, and refused with reasons wherever a program or a binding gets them wrong."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vtpu import kernels as K
from vtpu import siw
from vtpu.arena import Arena
from vtpu.sentron import LINEAR_WEIGHTS, RunError, Sentron, arena_bytes_for
from vtpu.siw import ProgramError

ROWS, WIDTH = 5, 64
RNG = np.random.default_rng(20261130)


def _pack(precision: str, w: np.ndarray):
    """w (N, K) packed as vtpu.models.bert packs a Linear weight in `precision`."""
    if precision == "bf16lin":
        return K.pack_bf16_weight(w)
    if precision == "int8lin":
        return K.quantize_int8_groups(np.ascontiguousarray(w.T), 32)
    return K.pack_int8_weight(w, group=32, outliers=[3, 17])


def _weights(precision: str, layers: int = 2) -> list:
    scale = 1 / np.sqrt(WIDTH)
    return [
        _pack(precision, (RNG.standard_normal((WIDTH, WIDTH)) * scale).astype(np.float32))
        for _ in range(layers)
    ]


def _looped(dtype: str) -> str:
    """Two layers of y = gelu(x @ W[r0] + b[r0]), x = y: one D.linear in a loop over a stack."""
    size = WIDTH * WIDTH
    return f"""
.tensor x f32[{ROWS},{WIDTH}] input
.tensor w_all {dtype}[2,{WIDTH},{WIDTH}] resident
.tensor b_all f32[2,{WIDTH}] resident
.tensor w {dtype}[{WIDTH},{WIDTH}] view(w_all,0+r0*{size},{WIDTH},1)
.tensor b f32[{WIDTH}] view(b_all,0+r0*{WIDTH},1)
.tensor t f32[{ROWS},{WIDTH}]
.tensor y f32[{ROWS},{WIDTH}] output
D.linear t, x, w, b act=gelu
S.load x, t tile=0 rows={ROWS} | C.loop 0 count=1 reg=r0
S.load y, x tile=0 rows={ROWS} | C.halt
"""


@pytest.mark.parametrize("dtype", ["bf16lin", "int8lin", "int8dyn"])
def test_a_looped_linear_reads_each_layers_packed_weight_bit_for_bit(dtype: str) -> None:
    weights = _weights(dtype)
    biases = (RNG.standard_normal((2, WIDTH)) * 0.1).astype(np.float32)
    x = RNG.standard_normal((ROWS, WIDTH)).astype(np.float32)
    program = siw.assemble(_looped(dtype))
    # the packed dtype and its stack survive text -> binary -> text
    assert f"{dtype}[2,{WIDTH},{WIDTH}] resident" in program.to_text()
    assert siw.decode(program.to_bytes()).to_text() == program.to_text()
    assert siw.assemble(program.to_text()).to_bytes() == program.to_bytes()
    with Sentron(Arena(arena_bytes_for(program))) as sentron:
        got = sentron.run(program, {"x": x}, resident={"w_all": tuple(weights), "b_all": biases})
    kernel = LINEAR_WEIGHTS[dtype][1]
    want = x
    for layer in range(2):
        want = kernel(want, weights[layer], biases[layer], "gelu")
    np.testing.assert_array_equal(got.outputs["y"], want)
    assert got.loops_taken == 1


def _plain(dtype: str, weight_shape: str = f"{WIDTH},{WIDTH}", word: str = "") -> str:
    return f"""
.tensor x f32[{ROWS},{WIDTH}] input
.tensor w {dtype}[{weight_shape}] resident
.tensor y f32[{ROWS},{WIDTH}] output
{word or "D.linear y, x, w"} | C.halt
"""


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_plain("int8dyn").replace("resident", "input"), "declare it resident"),
        (_plain("int8dyn").replace("resident", "random(3)"), "declare it resident"),
        (_plain("bf16lin").replace("resident", "resident output"), "not output"),
        (_plain("int8lin", f"{WIDTH}"), r"is \(K, N\), or \(layers, K, N\)"),
        (_plain("int8lin", f"1,1,{WIDTH},{WIDTH}"), r"is \(K, N\), or \(layers, K, N\)"),
        (_plain("int8dyn", word="D.add y, x, w"), "only D.linear's weight operand"),
        (_plain("int8dyn", word="D.gemm y, x, w"), "only D.linear's weight operand"),
        (_plain("int8dyn", word="D.linear y, w, x"), "only D.linear's weight operand"),
        (_plain("bf16lin", word="S.prefetch w tile=0 rows=1"), "S.prefetch: 'w' is a bf16lin"),
        (_plain("int8dyn", f"2,{WIDTH},{WIDTH}"), "needs 2-D operands"),
        (_plain("int8dyn", f"{WIDTH},32"), r"dst 'y' is \(5, 64\), the product is \(5, 32\)"),
        (_plain("int8lin", f"32,{WIDTH}"), "inner dims differ"),
        (_plain("i32"), "D.linear reads f32 .K, N. or a packed Linear weight"),
    ],
)
def test_programs_that_misuse_a_packed_weight_are_refused(text: str, match: str) -> None:
    with pytest.raises(ProgramError, match=match):
        siw.assemble(text)


def test_a_packed_bias_and_a_view_into_a_weight_are_refused() -> None:
    bias = _plain("f32", word="D.linear y, x, w, b").replace(
        ".tensor y", f".tensor b int8lin[{WIDTH},{WIDTH}] resident\n.tensor y"
    )
    with pytest.raises(ProgramError, match="only D.linear's weight operand"):
        siw.assemble(bias)
    stack = f".tensor w_all int8dyn[2,{WIDTH},{WIDTH}] resident\n"
    for view, match in [
        (f"int8dyn[{WIDTH},{WIDTH}] view(w_all,64,{WIDTH},1)", "selects one whole weight"),
        (f"int8dyn[32,{WIDTH}] view(w_all,0,{WIDTH},1)", "selects one whole weight"),
        (f"int8dyn[{WIDTH},{WIDTH}] view(w_all,0,1,{WIDTH})", "selects one whole weight"),
        (f"int8dyn[{WIDTH},{WIDTH}] view(w_all,0+r0*64,{WIDTH},1)", "selects one whole weight"),
        (f"f32[{WIDTH},{WIDTH}] view(w_all,0,{WIDTH},1)", "a f32 view of int8dyn 'w_all'"),
    ]:
        text = _plain("f32").replace(".tensor w f32", stack + f".tensor w {view} #")
        with pytest.raises(ProgramError, match=match):
            siw.assemble(text)
    past = _looped("int8dyn").replace("count=1", "count=2")  # r0 = 2 is a third layer
    with pytest.raises(ProgramError, match="on the last pass of loop 0..1"):
        siw.assemble(past)


def test_the_binary_form_carries_the_packed_dtypes() -> None:
    program = siw.assemble(_plain("int8dyn"))
    data = bytearray(program.to_bytes())
    assert siw.decode(bytes(data)).tensors[1].dtype == "int8dyn"
    entry = siw._HEADER.size + siw._ENTRY.size + 4 * 2 + 1  # tensor 1's entry, after x's
    assert data[entry + 2] == siw._DTYPE_CODE["int8dyn"]
    data[entry + 2] = 99
    with pytest.raises(ProgramError, match="unknown dtype code 99"):
        siw.decode(bytes(data))


def _run(text: str, resident: dict) -> None:
    program = siw.assemble(text)
    x = np.zeros((ROWS, WIDTH), np.float32)
    with Sentron(Arena(arena_bytes_for(program))) as sentron:
        sentron.run(program, {"x": x}, resident=resident)


def test_bindings_that_do_not_fit_the_declared_packed_weight_are_refused() -> None:
    (dyn,) = _weights("int8dyn", 1)
    (group,) = _weights("int8lin", 1)
    (bf16,) = _weights("bf16lin", 1)
    cases = [
        ("int8dyn", group, "is Int8GroupWeight; the program declares int8dyn"),
        ("int8dyn", np.zeros((WIDTH, WIDTH), np.float32), "is ndarray; the program declares"),
        (
            "bf16lin",
            _pack("bf16lin", np.zeros((32, WIDTH), np.float32)),
            r"is a \(K, N\) = \(64, 32\) weight; the program declares bf16lin\[64, 64\]",
        ),
        (
            "int8lin",
            dataclasses.replace(group, scale=group.scale[:1]),
            r"malformed Int8GroupWeight: scale must be float32 \(2, 64\)",
        ),
        ("int8lin", dataclasses.replace(group, group=0), "group 0 must be a positive integer"),
        (
            "int8dyn",
            dataclasses.replace(dyn, gsum=dyn.gsum.astype(np.int64)),
            r"gsum must be int32 \(2, 64\)",
        ),
        (
            "int8dyn",
            dataclasses.replace(dyn, outliers=np.array([3, 64])),
            r"outliers must be input channels in \[0, 64\)",
        ),
        ("int8dyn", dataclasses.replace(dyn, group=6), "group 6 must be a positive multiple of 4"),
        ("bf16lin", dataclasses.replace(bf16, packed=bf16.packed[:-2]), "packed must be uint16"),
    ]
    for dtype, value, match in cases:
        with pytest.raises(RunError, match=match):
            _run(_plain(dtype), {"w": value})
    text = _looped("int8dyn")
    biases = np.zeros((2, WIDTH), np.float32)
    with pytest.raises(RunError, match="a stack of 2 Int8Weights; bind a tuple of 2"):
        _run(text, {"w_all": (dyn,), "b_all": biases})
    with pytest.raises(RunError, match=r"'w_all' \(layer 1\) is Int8GroupWeight"):
        _run(text, {"w_all": (dyn, group), "b_all": biases})
