"""The benchmark workloads: each builds seeded inputs, a numpy reference, ours and a baseline.

Sizes: `full` is what the names say; `quick` keeps the named GEMM sizes but shrinks the large
tables (gather, top-k, PPT lookups) so the suite finishes in about a minute; `tiny` is for tests.
Every baseline is the fastest honest numpy (or scipy) way to compute the same result, timed with
the same preallocated outputs where numpy accepts `out=`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import erf

from vtpu import ops as op_count
from vtpu.bench import Case, Check, Workload, register

SEED = 20240917


def _rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """float32 in [-scale, scale), drawn directly in float32 (no float64 temporary)."""
    x = rng.random(shape, dtype=np.float32)
    x *= 2 * scale
    x -= scale
    return x


def close_to(reference: Any, *, rtol: float, atol_rel: float) -> Callable[[Any], Check]:
    """A check like np.testing.assert_allclose with atol relative to the reference's magnitude.

    The absolute part scales with max|ref| so one tolerance fits inputs of any size; the
    reference is kept in float64 so the comparison adds no rounding of its own.
    """
    ref = np.asarray(reference, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    atol = atol_rel * (scale or 1.0)
    tolerance = f"|ours - ref| <= {atol:.3g} + {rtol:g} * |ref|"

    def check(ours: Any) -> Check:
        out = np.asarray(ours, dtype=np.float64)
        if out.shape != ref.shape:
            return Check(False, None, tolerance, f"shape {out.shape}, reference {ref.shape}")
        if not np.isfinite(out).all():
            return Check(False, math.inf, tolerance, "ours has NaN or infinity")
        err = np.abs(out - ref)
        ok = bool(np.all(err <= atol + rtol * np.abs(ref)))
        return Check(ok, float(err.max()) if err.size else 0.0, tolerance)

    return check


def exactly(reference: np.ndarray) -> Callable[[Any], Check]:
    """A check for integer and copy results, which must match bit for bit."""

    def check(ours: Any) -> Check:
        out = np.asarray(ours)
        if out.shape != reference.shape:
            return Check(False, None, "exact", f"shape {out.shape}, reference {reference.shape}")
        diff = np.abs(out.astype(np.float64) - reference.astype(np.float64))
        return Check(bool(np.array_equal(out, reference)), float(diff.max()), "exact")

    return check


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """GELU as BERT defines it, 0.5 x (1 + erf(x / sqrt 2)), in place on a float32 array."""
    t = erf(x * np.float32(1 / math.sqrt(2)))
    t += 1
    t *= 0.5
    x *= t
    return x


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in place."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def layer_norm_np(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    centred *= 1 / np.sqrt(var + eps)
    centred *= gamma
    centred += beta
    return centred


def _kernels():
    from vtpu import kernels

    return kernels


# ---- dense ---------------------------------------------------------------------------------------


class _Gemm(Workload):
    n = 0
    baseline_name = "numpy matmul (float32, BLAS)"

    def __init__(self) -> None:
        self.name = f"gemm_{self.n}"
        self.description = f"fp32 GEMM {self.n}x{self.n}x{self.n} vs numpy @"
        tiny = min(self.n, 96)
        self.sizes = {"full": {"n": self.n}, "quick": {"n": self.n}, "tiny": {"n": tiny}}

    def build(self, n: int) -> Case:
        k = _kernels()
        rng = _rng(n)
        a, b = _uniform(rng, (n, n)), _uniform(rng, (n, n))
        out, out_ref = np.empty((n, n), np.float32), np.empty((n, n), np.float32)
        reference = np.matmul(a, b)
        return Case(
            ours=lambda: k.gemm(a, b, out=out),
            baseline=lambda: np.matmul(a, b, out=out_ref),
            baseline_name=self.baseline_name,
            check=close_to(reference, rtol=1e-4, atol_rel=1e-5),
            ops=op_count.gemm(n, n, n),
        )


@register
class Gemm256(_Gemm):
    n = 256


@register
class Gemm1024(_Gemm):
    n = 1024


@register
class Gemm2048(_Gemm):
    n = 2048


@register
class GemmInt8(Workload):
    name = "gemm_int8_1024"
    description = "int8 GEMM 1024^3 -> int32 vs the fastest exact numpy path"
    sizes = {"full": {"n": 1024}, "quick": {"n": 1024}, "tiny": {"n": 96}}

    def build(self, n: int) -> Case:
        k = _kernels()
        rng = _rng(8)
        a = rng.integers(-128, 128, (n, n), dtype=np.int8)
        b = rng.integers(-128, 128, (n, n), dtype=np.int8)
        # numpy's integer matmul has no BLAS (int32 at 512^3 takes ~20x float32's time). Float
        # BLAS is exact here: every partial sum is an integer of magnitude <= K * 128 * 128,
        # exactly representable in float32 up to 2**24 and in float64 up to 2**53.
        ftype = np.float32 if n * 128 * 128 <= 2**24 else np.float64
        name = f"numpy {np.dtype(ftype).name} matmul of the int8 inputs (exact), cast to int32"
        reference = (a.astype(np.int64) @ b.astype(np.int64)) if n <= 256 else None
        out = np.empty((n, n), np.int32)

        def baseline() -> np.ndarray:
            return np.matmul(a.astype(ftype), b.astype(ftype)).astype(np.int32)

        if reference is None:
            reference = baseline()
        return Case(
            ours=lambda: k.gemm_int8(a, b, out=out),
            baseline=baseline,
            baseline_name=name,
            check=exactly(reference.astype(np.int32)),
            ops=op_count.gemm(n, n, n),
            peak="int8",
        )


@register
class MlpBlock(Workload):
    name = "mlp_block"
    description = "transformer MLP: linear 384->1536 + GELU, linear 1536->384, m=128"
    sizes = {
        "full": {"m": 128, "d": 384, "f": 1536},
        "quick": {"m": 128, "d": 384, "f": 1536},
        "tiny": {"m": 16, "d": 32, "f": 64},
    }

    def build(self, m: int, d: int, f: int) -> Case:
        k = _kernels()
        rng = _rng(11)
        x = _uniform(rng, (m, d))
        w1, b1 = _uniform(rng, (d, f), 1 / math.sqrt(d)), _uniform(rng, (f,), 0.1)
        w2, b2 = _uniform(rng, (f, d), 1 / math.sqrt(f)), _uniform(rng, (d,), 0.1)
        h, y = np.empty((m, f), np.float32), np.empty((m, d), np.float32)
        hb, yb = np.empty((m, f), np.float32), np.empty((m, d), np.float32)

        def ours() -> np.ndarray:
            k.linear(x, w1, b1, "gelu", out=h)
            return k.linear(h, w2, b2, out=y)

        def baseline() -> np.ndarray:
            np.matmul(x, w1, out=hb)
            np.add(hb, b1, out=hb)
            gelu_erf(hb)
            np.matmul(hb, w2, out=yb)
            np.add(yb, b2, out=yb)
            return yb

        reference = baseline().copy()
        return Case(
            ours=ours,
            baseline=baseline,
            baseline_name="numpy @ + bias + erf GELU (scipy.special.erf)",
            check=close_to(reference, rtol=1e-4, atol_rel=1e-4),
            ops=op_count.linear(m, f, d, bias=True, activation=True)
            + op_count.linear(m, d, f, bias=True, activation=False),
        )


def _attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    scores = np.matmul(q, np.swapaxes(k, -1, -2))
    scores *= scale
    softmax_rows(scores)
    return np.matmul(scores, v)


def _attention_ops(heads: int, s: int, d: int) -> int:
    # As the kernel counts (vtpu.ops): every query sees all s keys (not causal).
    return op_count.attention(op_count.attention_scores(s, s, heads=heads), heads * s, d)


@register
class Attention(Workload):
    name = "attention"
    description = "scaled dot-product attention, 12 heads, seq 128, head dim 64"
    sizes = {
        "full": {"heads": 12, "s": 128, "d": 64},
        "quick": {"heads": 12, "s": 128, "d": 64},
        "tiny": {"heads": 2, "s": 16, "d": 8},
    }

    def build(self, heads: int, s: int, d: int) -> Case:
        k = _kernels()
        rng = _rng(12)
        q, kk, v = (_uniform(rng, (1, heads, s, d)) for _ in range(3))
        out = np.empty_like(q)
        scale = 1 / math.sqrt(d)
        reference = _attention_np(q, kk, v, scale)
        return Case(
            ours=lambda: k.attention(q, kk, v, scale=scale, out=out),
            baseline=lambda: _attention_np(q, kk, v, scale),
            baseline_name="numpy batched @ + stable softmax",
            check=close_to(reference, rtol=1e-4, atol_rel=1e-4),
            ops=_attention_ops(heads, s, d),
        )


@register
class LayerNormSoftmax(Workload):
    name = "layernorm_softmax"
    description = "layer norm then row softmax on 512x1024"
    sizes = {
        "full": {"m": 512, "n": 1024},
        "quick": {"m": 512, "n": 1024},
        "tiny": {"m": 8, "n": 32},
    }

    def build(self, m: int, n: int) -> Case:
        k = _kernels()
        rng = _rng(13)
        x = _uniform(rng, (m, n), 3.0)
        gamma, beta = 1 + _uniform(rng, (n,), 0.2), _uniform(rng, (n,), 0.2)
        y = np.empty_like(x)

        def ours() -> np.ndarray:
            k.layer_norm(x, gamma, beta, out=y)
            return k.softmax(y, out=y)

        def baseline() -> np.ndarray:
            return softmax_rows(layer_norm_np(x, gamma, beta))

        reference = baseline()
        return Case(
            ours=ours,
            baseline=baseline,
            baseline_name="numpy mean/var layer norm + stable softmax",
            check=close_to(reference, rtol=1e-4, atol_rel=1e-5),
            ops=(op_count.PER_ELEMENT["layer_norm"] + op_count.PER_ELEMENT["softmax"]) * m * n,
        )


@register
class EncoderLayer(Workload):
    name = "encoder_layer"
    description = "MiniLM-sized BERT encoder layer: 4x128 tokens, hidden 384, 12 heads, FFN 1536"
    sizes = {
        "full": {"batch": 4, "seq": 128, "hidden": 384, "heads": 12, "ffn": 1536},
        "quick": {"batch": 4, "seq": 128, "hidden": 384, "heads": 12, "ffn": 1536},
        "tiny": {"batch": 2, "seq": 8, "hidden": 16, "heads": 2, "ffn": 32},
    }

    def build(self, batch: int, seq: int, hidden: int, heads: int, ffn: int) -> Case:
        k = _kernels()
        rng = _rng(14)
        tokens, hd = batch * seq, hidden // heads
        x = _uniform(rng, (tokens, hidden))
        wqkv = _uniform(rng, (hidden, 3 * hidden), 1 / math.sqrt(hidden))
        bqkv = _uniform(rng, (3 * hidden,), 0.1)
        wo, bo = _uniform(rng, (hidden, hidden), 1 / math.sqrt(hidden)), _uniform(rng, (hidden,))
        w1, b1 = _uniform(rng, (hidden, ffn), 1 / math.sqrt(hidden)), _uniform(rng, (ffn,), 0.1)
        w2, b2 = _uniform(rng, (ffn, hidden), 1 / math.sqrt(ffn)), _uniform(rng, (hidden,), 0.1)
        g1, be1 = 1 + _uniform(rng, (hidden,), 0.1), _uniform(rng, (hidden,), 0.1)
        g2, be2 = 1 + _uniform(rng, (hidden,), 0.1), _uniform(rng, (hidden,), 0.1)
        scale = 1 / math.sqrt(hd)

        def split_heads(qkv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            # (tokens, 3*hidden) -> three (batch, heads, seq, hd) contiguous arrays
            t = qkv.reshape(batch, seq, 3, heads, hd).transpose(2, 0, 3, 1, 4)
            return tuple(np.ascontiguousarray(t[i]) for i in range(3))

        def merge_heads(ctx: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)).reshape(tokens, hidden)

        qkv = np.empty((tokens, 3 * hidden), np.float32)
        ctx = np.empty((batch, heads, seq, hd), np.float32)
        attn = np.empty((tokens, hidden), np.float32)
        x1 = np.empty((tokens, hidden), np.float32)
        h = np.empty((tokens, ffn), np.float32)
        f = np.empty((tokens, hidden), np.float32)
        x2 = np.empty((tokens, hidden), np.float32)

        def ours() -> np.ndarray:
            k.linear(x, wqkv, bqkv, out=qkv)
            q, kk, v = split_heads(qkv)
            k.attention(q, kk, v, scale=scale, out=ctx)
            k.linear(merge_heads(ctx), wo, bo, out=attn)
            np.add(
                attn, x, out=attn
            )  # the residual: numpy's add, the kernels have no fused residual yet
            k.layer_norm(attn, g1, be1, out=x1)
            k.linear(x1, w1, b1, "gelu", out=h)
            k.linear(h, w2, b2, out=f)
            np.add(f, x1, out=f)
            return k.layer_norm(f, g2, be2, out=x2)

        def baseline() -> np.ndarray:
            q, kk, v = split_heads(x @ wqkv + bqkv)
            a = merge_heads(_attention_np(q, kk, v, scale)) @ wo + bo
            a += x
            y1 = layer_norm_np(a, g1, be1)
            hh = y1 @ w1
            hh += b1
            ff = gelu_erf(hh) @ w2
            ff += b2
            ff += y1
            return layer_norm_np(ff, g2, be2)

        reference = baseline()
        ops = (
            2 * tokens * hidden * 3 * hidden
            + batch * _attention_ops(heads, seq, hd)
            + 2 * tokens * hidden * hidden
            + 2 * 2 * tokens * hidden * ffn
            + 2 * 8 * tokens * hidden  # two layer norms
            + tokens * (3 * hidden + 4 * hidden + 2 * ffn)  # biases, residual adds, GELU
        )
        return Case(
            ours=ours,
            baseline=baseline,
            baseline_name="the same layer in numpy (erf GELU, stable softmax)",
            check=close_to(reference, rtol=1e-3, atol_rel=1e-4),
            ops=ops,
        )


@register
class TopkCosine(Workload):
    name = "topk_cosine"
    description = "top-10 cosine similarity: 32 queries over a 100k x 384 store"
    sizes = {
        "full": {"n": 100_000, "d": 384, "queries": 32, "k": 10},
        "quick": {"n": 25_000, "d": 384, "queries": 32, "k": 10},
        "tiny": {"n": 500, "d": 16, "queries": 4, "k": 5},
    }

    def build(self, n: int, d: int, queries: int, k: int) -> Case:
        kern = _kernels()
        topk = kern.topk_similarity
        rng = _rng(15)
        store = _uniform(rng, (n, d))
        qs = _uniform(rng, (queries, d))

        def baseline() -> tuple[np.ndarray, np.ndarray]:
            # Norms every call: ours also takes a raw store, not a pre-normalised one.
            inv = 1 / np.linalg.norm(store, axis=1)
            scores = qs @ store.T
            scores *= inv
            scores /= np.linalg.norm(qs, axis=1)[:, None]
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            top = np.take_along_axis(scores, part, axis=1)
            order = np.argsort(-top, axis=1, kind="stable")
            return np.take_along_axis(part, order, axis=1), np.take_along_axis(top, order, axis=1)

        _, ref_scores = baseline()
        store64 = store.astype(np.float64)
        store_norm = np.linalg.norm(store64, axis=1)
        q64 = qs.astype(np.float64)
        q64 /= np.linalg.norm(q64, axis=1)[:, None]

        def check(result: tuple[np.ndarray, np.ndarray]) -> Check:
            # Ties may pick different indices, so check scores, and that the indices we return
            # really have those scores (recomputed in float64), rather than index equality.
            idx, scores = (np.asarray(r) for r in result)
            tolerance = "scores within 1e-4 of the reference top-k, and of the cosine at idx"
            if idx.shape != (queries, k) or scores.shape != (queries, k):
                return Check(False, None, tolerance, f"shapes {idx.shape}, {scores.shape}")
            if idx.min() < 0 or idx.max() >= n or any(len(set(r)) != k for r in idx.tolist()):
                return Check(False, None, tolerance, "indices out of range or repeated")
            actual = np.einsum("qd,qkd->qk", q64, store64[idx]) / store_norm[idx]
            err = max(
                float(np.abs(scores - ref_scores).max()), float(np.abs(scores - actual).max())
            )
            return Check(err <= 1e-4, err, tolerance)

        return Case(
            ours=lambda: topk(qs, store, k),
            baseline=baseline,
            baseline_name="numpy normalise + @ + argpartition",
            check=check,
            ops=op_count.topk_similarity(queries, n, d, cosine=True),
        )


# ---- memory --------------------------------------------------------------------------------------


@register
class Gather(Workload):
    name = "gather"
    description = "gather 256k random rows of a 1M x 64 fp32 table (embedding lookup)"
    sizes = {
        "full": {"rows": 1_000_000, "cols": 64, "picks": 262_144},
        "quick": {"rows": 250_000, "cols": 64, "picks": 131_072},
        "tiny": {"rows": 1000, "cols": 8, "picks": 256},
    }

    def build(self, rows: int, cols: int, picks: int) -> Case:
        kern = _kernels()
        gather = kern.gather_rows
        rng = _rng(16)
        table = rng.random((rows, cols), dtype=np.float32)
        index = rng.integers(0, rows, picks, dtype=np.int64)
        out, out_ref = np.empty((picks, cols), np.float32), np.empty((picks, cols), np.float32)
        reference = table[index]
        return Case(
            ours=lambda: gather(table, index, out=out),
            baseline=lambda: np.take(table, index, axis=0, out=out_ref),
            baseline_name="numpy take(axis=0, out=)",
            check=exactly(reference),
            ops=None,
            peak=None,
            bytes_moved=picks * cols * 4,  # bytes of rows delivered (read once, written once)
        )


# ---- phext page table ----------------------------------------------------------------------------


def check_translations(ppt: Any, pattern: np.ndarray, sample: int = 200) -> Check:
    """A page table is right when translation is a function, one-to-one, aligned and in range.

    Exact checks, no numeric tolerance: the same coordinate gives the same offset on a second
    pass and through single `translate`; distinct coordinates get distinct slots; every offset
    is slot-aligned inside the arena.
    """
    tolerance = "exact: deterministic, injective, slot-aligned, inside the arena"
    first = np.asarray(ppt.translate_many(pattern), dtype=np.uint64)
    again = np.asarray(ppt.translate_many(pattern), dtype=np.uint64)
    problems = []
    if not np.array_equal(first, again):
        problems.append(f"{int((first != again).sum())} offsets changed on a second pass")
    singles = [ppt.translate(row) for row in pattern[:sample].tolist()]
    if not np.array_equal(np.asarray(singles, dtype=np.uint64), first[:sample]):
        problems.append("translate and translate_many disagree")
    slot = _value(ppt.slot_bytes)
    arena = _value(ppt.arena_bytes)
    if (first % np.uint64(slot)).any():
        problems.append(f"offsets not aligned to the {slot}-byte slot")
    if first.size and int(first.max()) >= arena:
        problems.append(f"offset {int(first.max())} beyond the {arena}-byte arena")
    keys = np.ascontiguousarray(pattern).view(np.dtype((np.void, 18))).ravel()
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    per_key = np.zeros(len(unique_keys), dtype=np.uint64)
    per_key[inverse] = first
    if not np.array_equal(per_key[inverse], first):
        problems.append("one coordinate got two offsets")
    if len(np.unique(per_key)) != len(unique_keys):
        problems.append("two coordinates share one slot")
    return Check(not problems, None, tolerance, "; ".join(problems))


def _value(attr: Any) -> int:
    """A PPT size that may be exposed as a method or a property."""
    return int(attr() if callable(attr) else attr)


class _PPT(Workload):
    pattern_name = ""

    def __init__(self) -> None:
        self.name = f"ppt_{self.pattern_name}"
        self.sizes = {"full": {"n": 1_000_000}, "quick": {"n": 100_000}, "tiny": {"n": 4_000}}

    def run(self, size: str, repeats: int, tick: Callable[[float], None]) -> dict:
        from vtpu import ppt as ppt_module
        from vtpu.bench import measure_own_rate

        params = dict(self.sizes[size])
        make = getattr(ppt_module, f"{self.pattern_name}_pattern")
        pattern = np.ascontiguousarray(make(params["n"], seed=SEED % 2**32), dtype=np.uint16)
        ppt = ppt_module.PhextPageTable()
        params.update(tlb_sets=_value(ppt.tlb_sets), tlb_ways=_value(ppt.tlb_ways))
        check = check_translations(ppt, pattern)
        tick(0.2)

        def run() -> dict:
            m = ppt_module.measure(ppt, pattern, repeats=repeats)
            tick(1.0)
            return {
                "seconds": m["ns_per_lookup"] * len(pattern) / 1e9,
                "seconds_source": "median of timed passes over the pattern, each from a cold TLB",
                "lookups_per_second": m["lookups_per_s"],
                "ns_per_lookup": m["ns_per_lookup"],
                "miss_rate": m["miss_rate"],
                "cold_ns_per_lookup": m["cold_ns_per_lookup"],
                "pages_mapped": m["pages_mapped"],
                "lookups": len(pattern),
            }

        return measure_own_rate(self, params, repeats, run, check)


@register
class PPTStructured(_PPT):
    pattern_name = "structured"
    description = "phext page table: book-order reading (with look-backs), lookups/s and misses"


@register
class PPTRandom(_PPT):
    pattern_name = "random"
    description = "phext page table: uniform random coordinates, lookups/s and misses"


# ---- SIW and the sentron -------------------------------------------------------------------------

_ROUND_TRIP_PROGRAM = """\
.tensor x f32[128,256] input
.tensor w f32[256,512] random(7)
.tensor b f32[512] random(8)
.tensor y f32[128,512] output
.tensor z f32[128,512] output
D.linear y, x, w, b act=gelu | S.prefetch w tile=1 rows=64
D.softmax z, y | C.halt
"""


def check_siw_round_trip() -> Check:
    """Text -> program -> binary -> program -> text and binary again must change nothing."""
    from vtpu import siw

    program = siw.assemble(_ROUND_TRIP_PROGRAM)
    data = siw.encode(program)
    decoded = siw.decode(data)
    problems = []
    if decoded.to_text() != program.to_text():
        problems.append("decode(encode(p)) prints differently from p")
    if siw.encode(decoded) != data:
        problems.append("re-encoding the decoded program changes its bytes")
    if siw.assemble(siw.disassemble(data)).to_text() != program.to_text():
        problems.append("assemble(disassemble(bytes)) differs")
    return Check(not problems, None, "exact: assembler/encoder round trip", "; ".join(problems))


def _sentron_attr(name: str) -> Any:
    """A sentron entry point, from vtpu.sentron (or vtpu.siw, where some helpers may live)."""
    import importlib

    for module_name in ("vtpu.sentron", "vtpu.siw"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise RuntimeError(f"neither vtpu.sentron nor vtpu.siw provides {name}() yet")


@register
class SiwIssue(Workload):
    name = "siw_issue"
    description = "cost of issuing one SIW on a sentron (ns per word; no baseline)"
    sizes = {"full": {"words": 100_000}, "quick": {"words": 20_000}, "tiny": {"words": 256}}

    def run(self, size: str, repeats: int, tick: Callable[[float], None]) -> dict:
        from vtpu.bench import measure_own_rate

        params = dict(self.sizes[size])
        issue_overhead_ns = _sentron_attr("issue_overhead_ns")
        check = check_siw_round_trip()
        issue_overhead_ns(min(params["words"], 1000))  # warm-up

        def run() -> dict:
            samples = []
            for i in range(repeats):
                samples.append(float(issue_overhead_ns(params["words"], repeats=1)))
                tick((i + 1) / repeats)
            ns = float(np.median(samples))
            return {
                "seconds": ns * params["words"] / 1e9,
                "seconds_source": f"issuing {params['words']} words, median of {repeats} runs",
                "ns_per_siw": ns,
                "siw_per_second": 1e9 / ns if ns > 0 else None,
            }

        return measure_own_rate(self, params, repeats, run, check)


@register
class SentronOverlap(Workload):
    name = "sentron_overlap"
    description = "double-buffered tiled GEMM on a sentron: overlap fraction, speedup on vs off"
    sizes = {
        "full": {"m": 32, "k": 16384, "n": 1024, "tile_rows": 1024},
        "quick": {"m": 32, "k": 8192, "n": 1024, "tile_rows": 1024},
        "tiny": {"m": 8, "k": 256, "n": 64, "tile_rows": 64},
    }

    def run(self, size: str, repeats: int, tick: Callable[[float], None]) -> dict:
        from vtpu import sentron as sn
        from vtpu.arena import Arena
        from vtpu.bench import measure_own_rate

        params = dict(self.sizes[size])
        m, k, n, tile_rows = (params[key] for key in ("m", "k", "n", "tile_rows"))
        program = sn.tiled_gemm_program(m, k, n, tile_rows)
        inputs, reference = sn.tiled_gemm_inputs(m, k, n, tile_rows, seed=SEED % 2**32)
        outputs = {}
        for label, on in (("overlap", True), ("serial", False)):
            with sn.Sentron(Arena(sn.arena_bytes_for(program)), overlap=on) as sentron:
                outputs[label] = sentron.run(program, inputs).outputs["c"]
        check = close_to(reference, rtol=1e-4, atol_rel=1e-5)(outputs["overlap"])
        if not np.array_equal(outputs["overlap"], outputs["serial"]):
            check.correct = False
            check.detail = "overlap on and off give different results"
        tick(0.1)

        def run() -> dict:
            report = sn.measure_overlap(m, k, n, tile_rows, repeats=repeats)
            tick(1.0)
            on, off = report["overlap"], report["serial"]
            return {
                "seconds": on["wall_ns"] / 1e9,
                "seconds_source": f"median wall of {repeats} runs, overlap on/off interleaved",
                "speedup": report["wall_speedup"],
                "baseline_seconds": off["wall_ns"] / 1e9,
                "speedup_source": "median wall overlap off / median wall overlap on",
                "overlap_fraction": on["overlap_fraction"],
                "overlap_speedup": report["wall_speedup"],
                "serial_overlap_fraction": off["overlap_fraction"],
                "d_busy_ns": on["d_busy_ns"],
                "s_busy_ns": on["s_busy_ns"],
            }

        return measure_own_rate(
            self,
            params,
            repeats,
            run,
            check,
            baseline_name="the same program with overlap off (S then D, serial)",
            ops=op_count.gemm(m, n, k),
        )


@register
class SentronGemm(Workload):
    name = "sentron_gemm"
    description = "tiled GEMM as an SIW program on a sentron (1024^3, B tiles of 128) vs numpy @"
    sizes = {
        "full": {"m": 1024, "k": 1024, "n": 1024, "tile_rows": 128},
        "quick": {"m": 1024, "k": 1024, "n": 1024, "tile_rows": 128},
        "tiny": {"m": 16, "k": 32, "n": 24, "tile_rows": 8},
    }

    def build(self, m: int, k: int, n: int, tile_rows: int) -> Case:
        from vtpu import sentron as sn
        from vtpu.arena import Arena

        program = sn.tiled_gemm_program(m, k, n, tile_rows)
        inputs, reference = sn.tiled_gemm_inputs(m, k, n, tile_rows, seed=SEED % 2**32)
        a = np.concatenate([inputs[f"a{t}"] for t in range(k // tile_rows)], axis=1)
        b = inputs["b"]
        out = np.empty((m, n), np.float32)
        sentron = sn.Sentron(Arena(sn.arena_bytes_for(program)))
        sentron.run(program, inputs)  # validated once; the timed runs skip validation

        def ours() -> np.ndarray:
            return sentron.run(program, inputs, validate=False).outputs["c"]

        return Case(
            ours=ours,
            baseline=lambda: np.matmul(a, b, out=out),
            baseline_name="numpy matmul (float32, BLAS)",
            check=close_to(reference, rtol=1e-4, atol_rel=1e-5),
            ops=op_count.gemm(m, n, k),
        )


def _bert_np(w: dict, config: Any, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A BERT sentence encoder in plain numpy on the checkpoint's own weights ((N, K) Linear
    weights, separate Q/K/V): mean-pooled over each sequence's length, L2-normalised."""
    bsz, seq = ids.shape
    h, heads = config.hidden, config.heads
    d = h // heads
    x = w["embeddings.word_embeddings.weight"][ids]
    x += w["embeddings.position_embeddings.weight"][:seq]
    x += w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm_np(
        x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], config.eps
    )
    masked = np.arange(seq)[None, :] >= lengths[:, None]  # (B, S) padded keys
    for n in range(config.layers):
        p = f"encoder.layer.{n}."

        def lin(t: np.ndarray, name: str, p: str = p) -> np.ndarray:
            y = t @ w[f"{p}{name}.weight"].T
            y += w[f"{p}{name}.bias"]
            return y

        q, k, v = (
            lin(x, f"attention.self.{t}").reshape(bsz, seq, heads, d).transpose(0, 2, 1, 3)
            for t in ("query", "key", "value")
        )
        scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(1 / math.sqrt(d))
        scores[np.broadcast_to(masked[:, None, None, :], scores.shape)] = -np.inf
        ctx = np.matmul(softmax_rows(scores), v).transpose(0, 2, 1, 3).reshape(bsz, seq, h)
        a = lin(ctx, "attention.output.dense")
        a += x
        x = layer_norm_np(a, w[f"{p}attention.output.LayerNorm.weight"],
                          w[f"{p}attention.output.LayerNorm.bias"], config.eps)  # fmt: skip
        f = lin(gelu_erf(lin(x, "intermediate.dense")), "output.dense")
        f += x
        x = layer_norm_np(f, w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"],
                          config.eps)  # fmt: skip
    keep = (~masked)[:, :, None].astype(np.float32)
    pooled = (x * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def random_bert_weights(config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights of a BERT of `config`'s shape, drawn so activations stay in a trained model's
    range (speed does not depend on the values; the check compares with numpy on the same)."""
    h, i = config.hidden, config.intermediate
    w = {
        "embeddings.word_embeddings.weight": _uniform(rng, (config.vocab, h), 0.1),
        "embeddings.position_embeddings.weight": _uniform(rng, (config.max_positions, h), 0.1),
        "embeddings.token_type_embeddings.weight": _uniform(rng, (config.type_vocab, h), 0.1),
        "embeddings.LayerNorm.weight": 1 + _uniform(rng, (h,), 0.1),
        "embeddings.LayerNorm.bias": _uniform(rng, (h,), 0.1),
    }
    for n in range(config.layers):
        p = f"encoder.layer.{n}."
        shapes = {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (i, h),
            "output.dense": (h, i),
        }
        for name, (rows, cols) in shapes.items():
            w[f"{p}{name}.weight"] = _uniform(rng, (rows, cols), 1 / math.sqrt(cols))
            w[f"{p}{name}.bias"] = _uniform(rng, (rows,), 0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}{norm}.weight"] = 1 + _uniform(rng, (h,), 0.1)
            w[f"{p}{norm}.bias"] = _uniform(rng, (h,), 0.1)
    return w


@register
class MiniLMEncoder(Workload):
    name = "minilm_encoder"
    description = (
        "all-MiniLM-L6-v2-shaped sentence encoder compiled by phextcc to SIW (random weights): "
        "32 sequences of 128 tokens, 6 layers, mean pooling, L2 norm"
    )
    _MINILM = {"hidden": 384, "heads": 12, "layers": 6, "intermediate": 1536, "vocab": 30522}
    sizes = {
        "full": {**_MINILM, "batch": 32, "seq": 128},
        "quick": {**_MINILM, "batch": 8, "seq": 128},
        "tiny": {
            "hidden": 32,
            "heads": 4,
            "layers": 2,
            "intermediate": 64,
            "vocab": 1000,
            "batch": 3,
            "seq": 16,
        },  # fmt: skip
    }

    def build(
        self, hidden: int, heads: int, layers: int, intermediate: int, vocab: int, batch: int,
        seq: int,
    ) -> Case:  # fmt: skip
        from vtpu import phextcc
        from vtpu.models.bert import BertConfig
        from vtpu.phextcc import bert as phextcc_bert
        from vtpu.phextcc.lower import SiwModule

        config = BertConfig(hidden, heads, layers, intermediate, vocab, max_positions=512,
                            type_vocab=2, eps=1e-12, max_seq_length=256)  # fmt: skip
        rng = _rng(21)
        weights = random_bert_weights(config, rng)
        graph = phextcc.compile_graph(phextcc_bert.graph_from_weights(config, weights, self.name))
        ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        # mixed lengths, as a real batch has: from a quarter of seq to all of it
        lengths = np.linspace(seq, max(1, seq // 4), batch).astype(np.int32)

        module = SiwModule(graph)  # the SIW program the sentron runs, prepared for this shape
        module.forward(ids, lengths)

        def ours() -> np.ndarray:
            return module.forward(ids, lengths)

        def baseline() -> np.ndarray:
            return _bert_np(weights, config, ids, lengths)

        return Case(
            ours=ours,
            baseline=baseline,
            baseline_name="the same encoder in numpy (BLAS matmuls, erf GELU, masked softmax)",
            check=close_to(baseline(), rtol=1e-3, atol_rel=1e-4),
            ops=phextcc.count_ops(graph, lengths, seq),
        )


# ---- LLM decoding --------------------------------------------------------------------------------


@register
class Qwen3Decode(Workload):
    name = "qwen3_decode"
    description = (
        "greedy decoding of a random Qwen3 (fp32, GQA, tied embeddings): a short prompt, then "
        "N tokens one step at a time, vs a plain numpy decoder of the same weights"
    )
    _LAYER = {"hidden": 1024, "heads": 16, "kv_heads": 8, "head_dim": 128, "intermediate": 3072}
    sizes = {
        # Qwen3-0.6B's layer shape and vocabulary with 4 of its 28 layers (218 M parameters)
        "full": {**_LAYER, "layers": 4, "vocab": 151936, "prompt": 32, "steps": 32},
        "quick": {
            **{"hidden": 512, "heads": 8, "kv_heads": 4, "head_dim": 64, "intermediate": 1536},
            **{"layers": 4, "vocab": 32000, "prompt": 16, "steps": 32},
        },
        "tiny": {
            **{"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 128},
            **{"layers": 2, "vocab": 1024, "prompt": 8, "steps": 8},
        },
    }

    def build(self, prompt: int, steps: int, **dims: int) -> Case:
        import tempfile
        from pathlib import Path

        from vtpu.bench.llm import ReferenceQwen3, decode_ops, random_qwen3_weights, write_qwen3
        from vtpu.models.qwen3 import Qwen3Model

        shape = {**dims, "rope_theta": 1e6, "max_position": 4096, "tie": True}
        weights = random_qwen3_weights(shape, SEED)
        reference = ReferenceQwen3(weights, shape)
        ids = _rng(22).integers(0, shape["vocab"], prompt).tolist()
        per_token = shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * 4
        with tempfile.TemporaryDirectory(prefix="vtpu-qwen3-") as directory:
            write_qwen3(Path(directory), shape, weights)
            # room for two sequences, so a page size that rounds up never runs out
            cache_bytes = 2 * per_token * (prompt + steps + 64)
            model = Qwen3Model(Path(directory), "fp32", cache_bytes=cache_bytes)
            model.compile()  # the served path: the compiled SIW programs

        def ours() -> tuple[list[int], np.ndarray]:
            seq = model.new_sequence()
            try:
                logits = model.prefill(seq, ids)
                tokens, rows = [], []
                for i in range(steps):
                    rows.append(logits)
                    tokens.append(int(np.argmax(logits)))
                    if i + 1 < steps:
                        logits = model.decode([seq], [tokens[-1]])[0]
                return tokens, np.stack(rows)
            finally:
                model.free(seq)

        ref_tokens, ref_logits = reference.greedy(ids, steps)
        logits_close = close_to(ref_logits, rtol=1e-3, atol_rel=1e-3)

        def check(result: tuple[list[int], np.ndarray]) -> Check:
            tokens, logits = result
            if tokens != ref_tokens:
                pairs = zip(tokens, ref_tokens, strict=False)
                first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(ref_tokens))
                detail = f"greedy token {first} differs from the reference's"
                return Check(False, None, "greedy tokens equal, logits close", detail)
            outcome = logits_close(logits)
            outcome.tolerance = "greedy tokens equal; logits " + outcome.tolerance
            return outcome

        # the prompt's tokens (one lm_head), then steps - 1 decode steps
        ops = sum(decode_ops(shape, t, lm_head=False) for t in range(prompt))
        ops += 2 * shape["hidden"] * shape["vocab"]
        ops += sum(decode_ops(shape, prompt + t) for t in range(steps - 1))
        return Case(
            ours=ours,
            baseline=lambda: reference.greedy(ids, steps),
            baseline_name="the same decoder in plain numpy (BLAS matmuls, preallocated KV cache)",
            check=check,
            ops=ops,
            extras=lambda timing: {
                "tokens": steps,
                # generated tokens / wall time of prompt and decode together
                "tokens_per_second": steps / float(np.median(timing["ours"])),
                "baseline_tokens_per_second": (
                    steps / float(np.median(timing["baseline"])) if timing["baseline"] else None
                ),
                "weight_bytes": model.nbytes,
            },
        )
