"""Kernel-level routines of the Qwen3 decoder (docs/architecture.md, "LLM decoding (Qwen3)").

Two families, each called by every executor of the decoder so that they agree bit for bit:

- numpy routines over dense tensors (`silu`, `rope_inv_freq`, `rope`, `qk_norm_rope`,
  `kv_append`, `cached_attention`, `gqa_attention`): what phextcc.run interprets for the
  decoder's graph ops and what the sentron runs for the D ops they lower to (QK_NORM_ROPE,
  ATTN_GQA, SWIGLU, KV_APPEND, CACHED_ATTN).
- the paged KV cache (`PageTable`, `store`, `decode_attention`, `prefill_attention`): the
  `_decode` kernels and the causal chunk attention over a sequence's cache pages, as
  vtpu.models.qwen3's hand-written forward runs them and the sentron's KV_STORE_PAGED and
  PAGED_ATTN run them. The arena is float32 (frames, layers, 2, kv_heads, page_tokens *
  head_dim), K transposed per page, V row-major (vtpu.models.kvcache).

Contract: inputs are validated here (KernelInputError, a ValueError, with the reason) or by
the caller that builds them (the model, the SIW validator); the Cython kernels trust them.
Ops are counted through vtpu.counters.kernel_scope from the one table in vtpu.ops.
"""

from __future__ import annotations

import math

import numpy as np

from vtpu import kernels as K
from vtpu import ops as _ops
from vtpu.counters import kernel_scope
from vtpu.kernels import KernelInputError, _decode

__all__ = [
    "MAX_HEAD_DIM",
    "MAX_PAGE_TOKENS",
    "PageTable",
    "cached_attention",
    "decode_attention",
    "gqa_attention",
    "head_widths",
    "kv_append",
    "prefill_attention",
    "qk_norm_rope",
    "rope",
    "rope_inv_freq",
    "silu",
    "simd",
    "store",
]

MAX_PAGE_TOKENS = _decode.MAX_PAGE_TOKENS  # the C kernels' fixed scratch holds this many
MAX_HEAD_DIM = _decode.MAX_HEAD_DIM
_CPU_AVX2 = _decode.cpu_has_avx2()
# Below this many query-key multiply-adds (per layer) a decode attention runs on the calling
# thread: waking the OpenMP team for every layer costs more than a short context saves.
PARALLEL_ATTENTION = 1 << 20


def simd() -> bool:
    """The _decode kernels' AVX2+FMA build, unless vtpu.kernels.set_isa("generic")."""
    return _CPU_AVX2 and K.isa() != "generic"


# ---- dense routines (phextcc.run and the sentron's decoder D ops) ---------------------------


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x)); exp's overflow for very negative x gives -0."""
    with np.errstate(over="ignore"):
        y = np.exp(np.negative(x, out=out), out=out)
        y += 1.0
        return np.divide(x, y, out=y)


def rope_inv_freq(theta: float, d: int) -> np.ndarray:
    """Rotary inverse frequencies 1 / theta ** (2i / d), float32 (d / 2,), as transformers'."""
    half = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    return np.float32(1.0) / np.power(np.float32(theta), half, dtype=np.float32)


def head_widths(attrs: dict) -> tuple[int, int]:
    """(heads * head_dim, kv_heads * head_dim) of a grouped-query attention's attrs."""
    heads, kv, d = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    if heads % kv:
        raise ValueError(f"{heads} heads are not a multiple of {kv} kv heads")
    return heads * d, kv * d


def rope(x: np.ndarray, positions: np.ndarray, heads: int, d: int, theta: float,
         inv_freq: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Rotary embeddings, rotate-half layout, as transformers computes them in float32:
    angle = position / theta ** (2i / d); x * cos + rotate_half(x) * sin per head."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(theta, d)
    angles = positions.astype(np.float32)[..., None] * inv_freq  # (..., d / 2)
    cos = np.cos(angles)[..., None, :]
    sin = np.sin(angles)[..., None, :]
    xh = x.reshape(*x.shape[:-1], heads, d)
    x1, x2 = xh[..., : d // 2], xh[..., d // 2 :]
    y = np.empty(xh.shape, np.float32)
    y[..., : d // 2] = x1 * cos - x2 * sin
    y[..., d // 2 :] = x2 * cos + x1 * sin
    return y.reshape(x.shape)


def qk_norm_rope(a: list, attrs: dict, out: np.ndarray | None,
                 inv_freq: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The q and k heads of a packed projection RMS-normalised and rotated; v passes as is.
    a = [qkv, q_gamma, k_gamma, positions]; inv_freq: rope_inv_freq(theta, head_dim) when the
    caller holds it (SIW's resident table)."""
    qkv, q_gamma, k_gamma, positions = a
    y = qkv if out is not None else qkv.copy()
    q_w, kv_w = head_widths(attrs)
    d = attrs["head_dim"]
    for lo, width, gamma in ((0, q_w, q_gamma), (q_w, kv_w, k_gamma)):
        part = np.ascontiguousarray(y[..., lo : lo + width])
        heads = part.reshape(*part.shape[:-1], width // d, d)
        K.rms_norm(heads, gamma, attrs["eps"], out=heads)
        y[..., lo : lo + width] = rope(part, positions, width // d, d, attrs.get("theta"),
                                       inv_freq)  # fmt: skip
    return y


def _kv_split(qkv: np.ndarray, attrs: dict) -> tuple[np.ndarray, ...]:
    q_w, kv_w = head_widths(attrs)
    return qkv[..., :q_w], qkv[..., q_w : q_w + kv_w], qkv[..., q_w + kv_w :]


def _check_positions(positions: np.ndarray, limit: int, what: str) -> np.ndarray:
    if positions.dtype.kind not in "iu" or positions.ndim != 2:
        raise ValueError(f"{what}: positions must be integers (B, S), got {positions.dtype} "
                         f"{positions.shape}")  # fmt: skip
    if positions.size and (positions.min() < 0 or positions.max() >= limit):
        raise ValueError(f"{what}: positions must lie in [0, {limit}), the cache's length")
    return positions


def kv_append(a: list, attrs: dict) -> np.ndarray:
    """Write each token's k and v heads into its sequence's rows of a dense cache (2, B,
    kv_heads, T, head_dim), in place. a = [cache, qkv, positions] (packed) or [cache, k, v,
    positions]."""
    cache, positions = a[0], a[-1]
    k, v = _kv_split(a[1], attrs)[1:] if attrs.get("packed") else (a[1], a[2])
    _check_positions(positions, cache.shape[3], "kv_append")
    bsz, seq = positions.shape
    kv, d = attrs["kv_heads"], attrs["head_dim"]
    rows = np.repeat(np.arange(bsz), seq)
    at = positions.reshape(-1)
    cache[0, rows, :, at, :] = k.reshape(bsz * seq, kv, d)
    cache[1, rows, :, at, :] = v.reshape(bsz * seq, kv, d)
    return cache


def cached_attention(a: list, attrs: dict) -> np.ndarray:
    """One query per sequence against its cached keys 0..position (grouped-query) of a dense
    cache; a = [q or packed qkv, cache, positions]."""
    x, cache, positions = a
    q = _kv_split(x, attrs)[0] if attrs.get("packed") else x
    _check_positions(positions, cache.shape[3], "cached_attention")
    bsz, seq = positions.shape
    if seq != 1:
        raise ValueError("cached_attention: the decode graph takes one token per sequence")
    heads, d = attrs["heads"], attrs["head_dim"]
    q4 = np.ascontiguousarray(q.reshape(bsz, heads, 1, d))
    seen = (positions[:, 0] + 1).astype(np.int32)
    ctx = K.attention(q4, cache[0], cache[1], key_lengths=seen)
    return ctx.reshape(bsz, 1, heads * d)


def gqa_attention(a: list, attrs: dict, lengths: np.ndarray | None) -> np.ndarray:
    """Grouped-query attention over q (B, S, heads * D) and k, v (B, S, kv_heads * D), or one
    packed projection; heads go first for the kernel and are merged back after it."""
    q, k, v = _kv_split(a[0], attrs) if attrs.get("packed") else a[:3]
    bsz, seq = q.shape[:2]
    d = attrs["head_dim"]

    def heads_first(t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(t.reshape(bsz, seq, -1, d).transpose(0, 2, 1, 3))

    ctx = K.attention(heads_first(q), heads_first(k), heads_first(v),
                      causal=bool(attrs.get("causal")), key_lengths=lengths)  # fmt: skip
    return np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)).reshape(bsz, seq, q.shape[-1])


# ---- the paged KV cache (the hand-written forward and the sentron's paged D ops) ------------


class PageTable:
    """A step's view of the paged cache, validated: `table` int64 (B, 1 + max_pages), row b =
    sequence b's length after this step (its cached tokens, the step's `seq` new ones
    included), then its arena frames in token order (as the PPT translated them; entries
    beyond its pages are not read). The step's token s of sequence b sits at position
    length - seq + s, in frame table[b, 1 + position // P], slot position % P.

    Raises KernelInputError when a length is below `seq` or beyond the table's pages, or a
    frame the step reads or writes lies outside the arena's `frames`."""

    __slots__ = ("lengths", "frames", "page_start", "row_frames", "slots", "longest", "seq")

    def __init__(self, table: np.ndarray, seq: int, page_tokens: int, frames: int) -> None:
        if table.dtype != np.int64 or table.ndim != 2 or table.shape[1] < 2:
            raise KernelInputError(
                f"page table: int64 (batch, 1 + pages) expected, got {table.dtype}{table.shape}"
            )
        P = page_tokens
        bsz, cols = table.shape
        lengths = table[:, 0]
        if lengths.min() < seq or lengths.max() > (cols - 1) * P:
            raise KernelInputError(
                f"page table: lengths {lengths.tolist()} must lie in [{seq}, {(cols - 1) * P}]"
                f" (this step's {seq} token(s) .. {cols - 1} pages of {P} tokens)"
            )
        used = -(-lengths // P)  # pages each sequence reads
        mask = np.arange(cols - 1)[None, :] < used[:, None]
        frames_used = table[:, 1:][mask]
        if frames_used.size and (frames_used.min() < 0 or frames_used.max() >= frames):
            bad = frames_used[(frames_used < 0) | (frames_used >= frames)][0]
            raise KernelInputError(
                f"page table: frame {bad} is outside the KV arena's {frames} frames"
            )
        self.seq = seq
        self.lengths = np.ascontiguousarray(lengths)
        self.frames = np.ascontiguousarray(frames_used)  # ragged, sequence after sequence
        self.page_start = np.zeros(bsz + 1, np.int64)
        np.cumsum(used, out=self.page_start[1:])
        self.longest = int(used.max()) * P
        positions = (lengths[:, None] - seq + np.arange(seq)[None, :]).reshape(-1)
        rows = np.repeat(np.arange(bsz), seq)
        self.row_frames = np.ascontiguousarray(table[rows, 1 + positions // P])
        self.slots = positions % P


def _dense_heads(name: str, q: np.ndarray) -> None:
    """The kernels address q[m] as one dense (H, d) block; its rows may lie apart."""
    item = q.itemsize
    if q.dtype != np.float32 or q.strides[1:] != (q.shape[2] * item, item):
        raise KernelInputError(f"{name}: float32 (M, H, d) with dense (H, d) rows expected")


def store(
    qkv: np.ndarray,
    q_gamma: np.ndarray,
    k_gamma: np.ndarray,
    eps: float,
    cos: np.ndarray,
    sin: np.ndarray,
    arena: np.ndarray,
    layer: int,
    frames: np.ndarray,
    slots: np.ndarray,
    q_out: np.ndarray,
) -> None:
    """Rows m of the fused projection qkv (M, (H + 2 KV) d): the q heads RMS-normalised and
    rotated into q_out (M, H, d) -- which may be qkv's own q columns --, the k heads normalised,
    rotated and the v heads copied into frame frames[m], slot slots[m] of `layer` (the
    `_decode.qk_norm_rope_store` kernel)."""
    rows, heads, d = q_out.shape
    kv = arena.shape[3]
    _dense_heads("q_out", q_out)
    # The RMSNorm and the rotation of every q and k head (the v copy is no arithmetic).
    per_element = _ops.PER_ELEMENT["rms_norm"] + _ops.PER_ELEMENT["rope"]
    with kernel_scope(per_element * rows * (heads + kv) * d):
        _decode.qk_norm_rope_store(
            qkv, q_gamma, k_gamma, eps, cos, sin, arena, layer, frames, slots, q_out, simd(),
            K.num_threads() if rows >= 64 else 1,
        )  # fmt: skip


def decode_attention(
    q: np.ndarray,
    arena: np.ndarray,
    layer: int,
    frames: np.ndarray,
    page_start: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
    scratch: np.ndarray,
) -> None:
    """out[b, h] = attention of q[b, h] (B, H, d) over sequence b's lengths[b] cached tokens of
    `layer`, read in place from frames[page_start[b]:page_start[b + 1]] (the `_decode` kernel);
    scratch (B * H, >= the longest sequence's pages * page_tokens)."""
    bsz, heads, d = q.shape
    _dense_heads("q", q)
    work = int(lengths.sum()) * heads * d
    threads = K.num_threads() if work >= PARALLEL_ATTENTION else 1
    with kernel_scope(_ops.attention(work // d, bsz * heads, d)):
        _decode.decode_attention(
            q, arena, layer, frames, page_start, lengths, np.float32(1.0 / math.sqrt(d)), out,
            scratch, simd(), threads,
        )  # fmt: skip


def prefill_attention(
    q: np.ndarray, arena: np.ndarray, layer: int, frames: np.ndarray, seen: int
) -> np.ndarray:
    """Causal attention of a chunk's queries q (m, H, d), the last m of the sequence's `seen`
    cached tokens, over its pages frames[:ceil(seen / P)] of `layer`, gathered dense for
    vtpu.kernels.attention; (m, H * d)."""
    m, heads, d = q.shape
    kv = arena.shape[3]
    P = arena.shape[4] // d
    n_pages = -(-seen // P)
    pages = frames[:n_pages]
    k = arena[pages, layer, 0].reshape(n_pages, kv, d, P).transpose(1, 0, 3, 2)
    v = arena[pages, layer, 1].reshape(n_pages, kv, P, d).transpose(1, 0, 2, 3)
    k = np.ascontiguousarray(k.reshape(kv, n_pages * P, d)[None, :, :seen])
    v = np.ascontiguousarray(v.reshape(kv, n_pages * P, d)[None, :, :seen])
    out = K.attention(np.ascontiguousarray(q.transpose(1, 0, 2))[None], k, v, causal=True)
    return np.ascontiguousarray(out[0].transpose(1, 0, 2)).reshape(m, heads * d)
