"""The ISA's encoder ops: views into resident and arena tensors, fused norms, packed attention,
pooling, L2 normalisation and GELU compute what the kernels' references compute; bad programs are
refused with the reason (a 4xx at the agent), never a crash."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.test_agent import agent, call_json  # noqa: F401 - the agent fixture
from vtpu import kernels as K
from vtpu import siw
from vtpu.arena import Arena
from vtpu.sentron import RunError, Sentron, arena_bytes_for
from vtpu.siw import ProgramError

rng = np.random.default_rng(7)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def run(text: str, inputs=None, resident=None):
    program = siw.assemble(text)
    with Sentron(Arena(arena_bytes_for(program) + 4096)) as sentron:
        return sentron.run(program, inputs or {}, resident=resident)


def refused(text: str, reason: str, *fragments: str) -> ProgramError:
    with pytest.raises(ProgramError) as info:
        siw.assemble(text)
    assert info.value.reason == reason, info.value
    for fragment in fragments:
        assert fragment in str(info.value)
    return info.value


# ---- views ----------------------------------------------------------------------------------


def test_views_reshape_and_transpose_resident_and_arena_tensors() -> None:
    w = f32(4, 6)
    x = f32(2, 12)
    result = run(
        """
        .tensor w f32[4,6] resident
        .tensor wt f32[6,4] view(w,0,1,6)          # the transpose: strides swapped
        .tensor x f32[2,12] input
        .tensor x3 f32[6,4] view(x,0,4,1)          # the same 24 values as 6 rows of 4
        .tensor row f32[4] view(w,6,1)             # row 1 of w, first 4 values
        .tensor t f32[6,4]
        .tensor y f32[6,4] output
        S.load t, wt tile=0 rows=6
        D.add y, x3, row
        D.add y, y, t | C.halt
        """,
        {"x": x},
        {"w": w},
    )
    expected = x.reshape(6, 4) + w[1, :4] + w.T
    np.testing.assert_array_equal(result.outputs["y"], expected)


def test_views_round_trip_through_binary_and_text() -> None:
    text = """
    .tensor w f32[4,6] resident
    .tensor wt f32[6,4] view(w,0,1,6)
    .tensor t f32[6,4] output
    S.load t, wt tile=0 rows=6 | C.halt
    """
    program = siw.assemble(text)
    again = siw.decode(siw.encode(program))
    assert again.tensors == program.tensors
    assert siw.to_text(again) == siw.to_text(program)
    assert siw.encode(siw.assemble(siw.to_text(again))) == siw.encode(program)
    assert "view(w,0,1,6)" in siw.to_text(again) and "resident" in siw.to_text(again)


def test_a_resident_tensor_is_used_in_place_not_copied() -> None:
    w = f32(3, 3)
    program = siw.assemble(
        ".tensor w f32[3,3] resident\n.tensor x f32[3,3] input\n.tensor y f32[3,3] output\n"
        "D.gemm y, x, w | C.halt"
    )
    with Sentron(Arena(arena_bytes_for(program))) as sentron:
        assert arena_bytes_for(program) < 2 * 64 + 2 * 36  # only x and y take arena memory
        prepared = sentron.prepare(program, {"w": w})
        assert prepared.views[0] is w
        x = f32(3, 3)
        np.testing.assert_allclose(sentron.run(prepared, {"x": x}).outputs["y"], x @ w, 1e-5)


@pytest.mark.parametrize(
    ("text", "reason", "fragment"),
    [
        (".tensor b f32[4]\n.tensor v f32[2,3] view(b,0,3,1)", "out of range", "element 5"),
        (".tensor b f32[8]\n.tensor v f32[2] view(c,0,1)", "bad tensor", "not declared"),
        (
            ".tensor b f32[8]\n.tensor v f32[4] view(b,0,1)\n.tensor u f32[2] view(v,0,1)",
            "bad tensor",
            "itself be a view",
        ),  # fmt: skip
        (".tensor b i32[8]\n.tensor v f32[8] view(b,0,1)", "wrong dtype", "view of i32"),
        (".tensor b f32[8]\n.tensor v f32[2,2] view(b,0,1)", "bad tensor", "one stride"),
    ],
)
def test_bad_views_are_refused(text: str, reason: str, fragment: str) -> None:
    refused(text + "\nC.halt", reason, fragment)


def test_d_operands_must_be_dense_and_resident_tensors_read_only() -> None:
    refused(
        ".tensor w f32[2,3] resident\n.tensor wt f32[3,2] view(w,0,1,3)\n.tensor y f32[3,2]\n"
        "D.add y, wt, wt | C.halt",
        "bad operand", "strided view", "S.load",
    )  # fmt: skip
    refused(".tensor w f32[4] resident\n.tensor x f32[4]\nD.add w, x, x | C.halt", "read-only", "w")
    refused(
        ".tensor w f32[4] resident\n.tensor v f32[2] view(w,2,1)\n.tensor x f32[2]\n"
        "S.load v, x tile=0 rows=2 | C.halt",
        "read-only", "resident 'w'",
    )  # fmt: skip


def test_aliasing_through_views_is_refused_or_ordered() -> None:
    # dst overlaps a source through a view: a GEMM would read what it writes
    refused(
        ".tensor b f32[4,4]\n.tensor lo f32[2,4] view(b,0,4,1)\n.tensor hi f32[2,4] view(b,8,4,1)"
        "\n.tensor w f32[4,4]\nD.gemm lo, hi, w | C.halt",
        "bad operand", "shares memory",
    )  # fmt: skip
    # D writes a view of b while S writes b itself: a race on b's memory
    refused(
        ".tensor b f32[4,4]\n.tensor v f32[16] view(b,0,1)\n.tensor x f32[16]\n"
        ".tensor src f32[4,4]\nD.add v, x, x | S.load b, src tile=0 rows=4\nC.halt",
        "data race", "'b'",
    )  # fmt: skip
    # D writes a view of b while S reads b: S is issued first, so it sees b's old values
    program = siw.assemble(
        ".tensor b f32[2,2] ones\n.tensor v f32[4] view(b,0,1)\n.tensor x f32[4] ones\n"
        ".tensor out f32[2,2] output\nD.add v, x, x | S.load out, b tile=0 rows=2\nC.halt"
    )
    assert siw.issue_order(program, 0) == siw.ORDER_S_FIRST
    with Sentron(Arena(arena_bytes_for(program))) as sentron:
        np.testing.assert_array_equal(sentron.run(program).outputs["out"], np.ones((2, 2)))


def test_missing_or_mismatched_resident_tensors_are_run_errors() -> None:
    text = ".tensor w f32[2,2] resident\n.tensor y f32[2,2] output\nD.add y, w, w | C.halt"
    with pytest.raises(RunError, match="not registered on this node"):
        run(text)
    with pytest.raises(RunError, match=r"declares f32\[2, 2\]"):
        run(text, resident={"w": f32(3, 2)})
    with pytest.raises(RunError, match="declares"):
        run(text, resident={"w": f32(4, 4)[:, :2]})  # not dense


# ---- encoder ops --------------------------------------------------------------------------------


def test_add_layernorm_gelu_l2norm_compute_what_the_kernels_do() -> None:
    x, r, gb = f32(5, 8), f32(5, 8), f32(2, 8)
    result = run(
        """
        .tensor x f32[5,8] input
        .tensor r f32[5,8] input
        .tensor gb f32[2,8] resident
        .tensor n f32[5,8] output
        .tensor g f32[5,8] output
        .tensor u f32[5,8] output
        D.add_layernorm n, x, r, gb eps=1e-6
        D.gelu g, n
        D.l2norm u, g | C.halt
        """,
        {"x": x, "r": r},
        {"gb": gb},
    )
    n = K.add_layer_norm(x, r, gb[0], gb[1], 1e-6)
    np.testing.assert_array_equal(result.outputs["n"], n)
    g = K.bias_activation(n.copy(), None, "gelu")
    np.testing.assert_array_equal(result.outputs["g"], g)
    np.testing.assert_array_equal(result.outputs["u"], K.l2_normalize(g))
    from scipy.special import erf

    exact = 0.5 * n * (1 + erf(n.astype(np.float64) / np.sqrt(2)))
    np.testing.assert_allclose(g, exact, rtol=1e-5, atol=1e-6)


def test_packed_attention_and_masked_mean_pool_through_views() -> None:
    bsz, seq, heads, d = 2, 5, 2, 4
    width = heads * d
    qkv = f32(bsz * seq, 3 * width)
    lengths = np.array([5, 2], np.int32)
    result = run(
        f"""
        .tensor qkv f32[{bsz * seq},{3 * width}] input
        .tensor lengths i32[{bsz}] input
        .tensor q3 f32[{bsz},{seq},{3 * width}] view(qkv,0,{seq * 3 * width},{3 * width},1)
        .tensor ctx f32[{bsz * seq},{width}] output
        .tensor c3 f32[{bsz},{seq},{width}] view(ctx,0,{seq * width},{width},1)
        .tensor pooled f32[{bsz},{width}] output
        D.attn_qkv c3, q3, lengths heads={heads}
        D.mean_pool pooled, c3, lengths | C.halt
        """,
        {"qkv": qkv, "lengths": lengths},
    )
    ctx = K.attention_packed(qkv.reshape(bsz, seq, -1), heads, key_lengths=lengths)
    np.testing.assert_array_equal(result.outputs["ctx"].reshape(ctx.shape), ctx)
    pooled = K.masked_mean_pool(ctx, lengths)
    np.testing.assert_array_equal(result.outputs["pooled"], pooled)
    np.testing.assert_allclose(pooled[1], ctx[1, :2].mean(axis=0), rtol=1e-5, atol=1e-6)
    # ops count only the keys and rows the lengths let through
    from vtpu import ops

    scores = ops.attention_scores(seq, seq, heads=heads, key_lengths=lengths)
    expected = ops.attention(scores, bsz * heads * seq, d) + ops.masked_mean_pool(7, bsz, width)
    assert result.ops == expected


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [
        ("D.attn_qkv c, q, lengths heads=3", "shape mismatch", "heads=3"),
        ("D.attn_qkv c, q, lengths", "syntax", "needs heads=N"),
        ("D.attn_qkv c, q, flen heads=2", "wrong dtype", "1-D i32"),
        ("D.mean_pool p, c, lengths2", "shape mismatch", "lengths (3,)"),
        ("D.add_layernorm x, x, x, g1", "shape mismatch", "needs (2, 8)"),
        ("D.l2norm p, x", "shape mismatch", "dst is (2, 8)"),
        ("D.gelu x, c", "shape mismatch", "x is (2, 3, 8)"),
    ],
)
def test_bad_encoder_ops_are_refused(body: str, reason: str, fragment: str) -> None:
    decl = """
    .tensor q f32[2,3,24]
    .tensor c f32[2,3,8]
    .tensor lengths i32[2]
    .tensor lengths2 i32[3]
    .tensor flen f32[2]
    .tensor x f32[4,8]
    .tensor g1 f32[8]
    .tensor p f32[2,8]
    """
    refused(decl + body + " | C.halt", reason, fragment)


def test_lengths_out_of_range_are_a_run_error_not_a_crash() -> None:
    text = """
    .tensor x f32[2,3,4] input
    .tensor lengths i32[2] input
    .tensor p f32[2,4] output
    D.mean_pool p, x, lengths | C.halt
    """
    with pytest.raises(RunError, match="lengths must lie in"):
        run(text, {"x": f32(2, 3, 4), "lengths": np.array([1, 9], np.int32)})


def test_the_agent_answers_a_program_with_unknown_resident_tensors_with_400(
    agent,  # noqa: F811 - the fixture imported above
) -> None:
    body = {"program": ".tensor w f32[2] resident\n.tensor y f32[2] output\nD.add y, w, w | C.halt"}
    status, doc = call_json(agent, "POST", "/vTPU/programs", body)
    assert status == 400, doc
    assert "not registered" in str(doc)
    bad = {"program": ".tensor w f32[4] resident\n.tensor x f32[4]\nD.add w, x, x | C.halt"}
    status, doc = call_json(agent, "POST", "/vTPU/programs", bad)
    assert status == 400 and "read-only" in str(doc), doc
    status, _ = call_json(agent, "GET", "/vTPU/health", None, token=None)
    assert status == 200


# ---- the decoder's ops (Qwen3) ---------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_packed_matmul_rows_and_add_rmsnorm_compute_what_the_kernels_do(precision) -> None:
    from vtpu.kernels import packed

    w = packed.pack(f32(6, 8), precision)
    dtype = {"fp32": "f32", "bf16": "bf16", "int8": "i8"}[precision]
    scale = ", w_scale" if w.scale is not None else ""
    resident = {"w": w.data, "g": f32(8)}
    if w.scale is not None:
        resident["w_scale"] = w.scale
    ids = np.array([5, 0, 5], np.int64)
    x, res = f32(3, 8), f32(3, 8)
    result = run(
        f"""
        .tensor w {dtype}[6,8] resident
        {".tensor w_scale f32[6] resident" if scale else ""}
        .tensor g f32[8] resident
        .tensor ids i64[3] input
        .tensor x f32[3,8] input
        .tensor res f32[3,8] input
        .tensor e f32[3,8] output
        .tensor n f32[3,8] output
        .tensor y f32[3,6] output
        D.rows e, w, ids{scale}
        D.add_rmsnorm n, x, res, g eps=1e-5
        D.matmul y, n, w{scale}
        D.add e, e, x | C.halt
        """,
        {"ids": ids, "x": x, "res": res},
        resident,
    )
    total = K.add(x, res)  # add_rmsnorm leaves the sum in x, which the last word reads
    np.testing.assert_array_equal(result.outputs["e"], K.add(packed.rows(w, ids), total))
    n = K.rms_norm(total, resident["g"], 1e-5)
    np.testing.assert_array_equal(result.outputs["n"], n)
    np.testing.assert_array_equal(result.outputs["y"], packed.matmul(n, w))


def test_inout_tensors_are_updated_in_place_and_never_copied() -> None:
    program = siw.assemble(
        """
        .tensor state f32[4,8] inout
        .tensor x f32[4,8] input
        .tensor gate f32[4,16] input
        .tensor s f32[4,8] output
        D.add state, state, x
        D.swiglu s, gate | C.halt
        """
    )
    state, x, gate = f32(4, 8), f32(4, 8), f32(4, 16)
    before = state.copy()
    with Sentron(Arena(arena_bytes_for(program))) as sentron:
        assert arena_bytes_for(program) < 3 * state.nbytes + 4096  # the state takes no arena
        result = sentron.run(program, {"state": state, "x": x, "gate": gate})
        np.testing.assert_array_equal(state, before + x)
        from vtpu.kernels import decoder

        up = gate[:, 8:]
        np.testing.assert_array_equal(result.outputs["s"], decoder.silu(gate[:, :8]) * up)
        with pytest.raises(RunError, match="missing input"):
            sentron.run(program, {"x": x, "gate": gate})


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [
        ("D.matmul y, x, w8", "bad operand", "an i8 weight takes an f32 (N,) scale"),
        ("D.matmul y, x, w, s6", "bad operand", "others none"),
        ("D.matmul y, x, wt", "shape mismatch", "x (m, 3) @ W(6, 3).T -> dst (m, 6); got x (2, 4)"),
        ("D.matmul y, x, i", "wrong dtype", "must be 2-D (N, K) f32, bf16 or i8"),
        ("D.rows e, w, fidx", "wrong dtype", "index 'fidx' must be i32 or i64"),
        (
            "D.rows y, w, i",
            "shape mismatch",
            "index (r,) -> dst (r, 4); got index (2,), dst (2, 6)",
        ),
        ("D.add_rmsnorm n, x8, x8, g8", "bad operand", "shares memory with another source"),
        ("D.add_rmsnorm n, r8, x8, g8", "read-only", "resident tensors are read-only"),
        ("D.qk_norm_rope q, gm, fr, pos heads=3", "shape mismatch", "heads=3 + 2 kv_heads"),
        ("D.qk_norm_rope q, gm, fr, pos", "syntax", "needs heads=N"),
        ("D.qk_norm_rope q, gm, g8, pos heads=4", "shape mismatch", "inv_freq must be (2,)"),
        ("D.attn_gqa c, q heads=4", "shape mismatch", "heads=4 + 2 kv_heads"),
        ("D.attn_gqa c, q heads=5", "shape mismatch", "qkv (batch, seq, width) -> dst"),
        ("D.swiglu x8, x8", "shape mismatch", "gate then up"),
        ("D.kv_append cache, q, pos heads=6", "shape mismatch", "cache has 2 kv heads"),
        ("D.kv_append q, q, pos heads=4", "shape mismatch", "cache (2, batch, kv_heads"),
        ("D.cached_attn c, q, cache, pos heads=4", "shape mismatch", "one token per sequence"),
        ("D.kv_append cache, q, fidx heads=4", "wrong dtype", "positions 'fidx' must be i32"),
        ("D.add_rmsnorm n, n, x8, g8", "bad operand", "dst must not also be a source"),
    ],
)
def test_bad_decoder_ops_are_refused(body: str, reason: str, fragment: str) -> None:
    decl = """
    .tensor w f32[6,4] resident
    .tensor w8 i8[6,4] resident
    .tensor wt f32[6,3] resident
    .tensor s6 f32[6] resident
    .tensor x f32[2,4]
    .tensor y f32[2,6]
    .tensor i i64[2]
    .tensor fidx f32[2]
    .tensor e f32[2,4]
    .tensor x8 f32[2,8]
    .tensor r8 f32[2,8] resident
    .tensor n f32[2,8]
    .tensor g8 f32[8]
    .tensor q f32[2,3,32]
    .tensor gm f32[2,4]
    .tensor fr f32[2]
    .tensor pos i64[2,3]
    .tensor c f32[2,3,12]
    .tensor cache f32[2,2,2,16,4]
    """
    refused(decl + body + " | C.halt", reason, fragment)
