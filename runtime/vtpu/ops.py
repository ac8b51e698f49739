"""The one op-count table: how many arithmetic ops each kernel retires, from shapes alone.

A multiply-add is 2 ops, a transcendental 1. The kernels count with these functions, the sentron
counts a program's words with them, and the benchmark's figures use them, so the three agree.
"""

from __future__ import annotations

import numpy as np

# Ops per element of the row-wise and element-wise kernels.
PER_ELEMENT = {
    "add": 1,
    "mul": 1,
    "layer_norm": 8,
    "rms_norm": 4,
    "softmax": 5,
    "quantize_int8": 3,
    "add_layer_norm": 9,  # the residual add, then layer_norm's 8
    "l2_normalize": 3,  # square-accumulate (2) and the division
    "rope": 3,  # rotary embedding: x * cos, then + rotate_half(x) * sin (a multiply-add)
}


def masked_mean_pool(rows: int, batch: int, d: int) -> int:
    """One add per element of the `rows` unmasked rows pooled, one scale per output value."""
    return rows * d + batch * d


def gemm(m: int, n: int, k: int) -> int:
    """C(m, n) = A(m, k) @ B(k, n), float or int8."""
    return 2 * m * n * k


def linear(m: int, n: int, k: int, *, bias: bool, activation: bool) -> int:
    """GEMM plus one op per output element for the bias and one for the activation."""
    return gemm(m, n, k) + m * n * (int(bias) + int(activation))


def attention_scores(
    sq: int, sk: int, *, heads: int = 1, causal: bool = False, key_lengths=None
) -> int:
    """Query-key pairs attention computes: the keys each query row sees, summed over rows and
    heads (key_lengths per batch masks padding; without it one batch of sk keys)."""
    if not causal:  # every query row of a batch sees that batch's keys (counted per run: cheap)
        if key_lengths is None:
            return max(sk, 0) * sq * heads
        return sum(max(int(n), 0) for n in key_lengths) * sq * heads
    lengths = np.asarray([sk] if key_lengths is None else key_lengths, dtype=np.int64)
    visible = np.broadcast_to(lengths[:, None], (lengths.size, sq))
    if causal:
        visible = np.minimum(visible, np.arange(sq) + (sk - sq) + 1)
    return int(np.clip(visible, 0, None).sum()) * heads


def attention(scores: int, rows: int, d: int) -> int:
    """Per score: QK dot (2D), PV multiply-add (2D), softmax (5); per query row: the final
    1/sum scaling of its D outputs."""
    return scores * (4 * d + 5) + rows * d


def topk_similarity(nq: int, nk: int, d: int, *, cosine: bool) -> int:
    ops = 2 * nq * nk * d
    if cosine:
        ops += 2 * nq * nk + 2 * (nq + nk) * d
    return ops
