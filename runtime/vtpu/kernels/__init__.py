"""The vTPU's compute kernels: the Python layer that validates, and the Cython that computes.

Every public function here checks dtype, shape, contiguity, aliasing and limits, raises
`KernelInputError` (a `ValueError`) with a message saying what to change, and only then calls a
`nogil` kernel in `_dense` (D pipe: GEMM, fused bias+activation, norms, softmax, attention, int8
GEMM, top-k similarity) or `_sparse` (S pipe: row gather and scatter). Linear weights resident in
fp32, bf16 or int8 for LLM decode and prefill live in `vtpu.kernels.packed` (over `_packed`). Arrays are float32 (int8
for the int8 GEMM); a non-contiguous input is copied once, an `out=` array must be C-contiguous.

Instruction sets: the kernels pick the widest level the CPU and OS support at run time --
"avx512" (F+BW+VL), "avx2" (AVX2+FMA) or "generic" (portable C) -- and `set_isa(name)` forces a
lower one (tests compare every path on one machine). Levels are ordered: a kernel without an
AVX-512 body runs its AVX2 body at "avx512"; the AVX-512 bodies are vtpu.kernels.packed's, and
linear_dynamic_int8's (VNNI) and linear_bf16's (BF16) where the CPU has those extensions.
AMX: linear_bf16 and linear_dynamic_int8 run on AMX tiles (BF16, INT8) where the CPU has them (Intel Sapphire Rapids on; our
CI runs on whichever of our two machine kinds the session has, so that path is tested on the
Intel one and skipped, with the reason, on AMD), each after a self-check at its first call
against the AVX-512 path it replaces; `use_amx(False)` turns them off. GEMM goes through the BLAS that scipy links.

Ops counted per call (`vtpu.counters`) come from the one op-count table, `vtpu.ops` (a
multiply-add is 2; a transcendental counts 1):
gemm 2MNK; linear 2MNK + MN per bias + MN per activation; layer_norm 8 per element;
add_layer_norm 9; rms_norm 4; softmax 5; l2_normalize 3; masked_mean_pool 1 per pooled element
+ 1 per output; attention (4D + 5) per query-key score + D per query row; gemm_int8 2MNK;
topk_similarity 2QND (+ 2QN + 2(Q+N)D for cosine); add/mul 1 per element; quantize_int8 3 per element; linear_int8 is
its int8 GEMM plus bias/activation (the float rescale is not counted); linear_dynamic_int8 and
linear_bf16 count as linear (rounding or quantising the activations is not counted); linear_weight_int8 as linear
plus 1 per weight widened. gather/scatter move bytes and count 0 ops.

Reduced precision for resident models: `linear_weight_int8` (weight-only: int8 per output channel
and group of input rows, widened to fp32 per call, then BLAS) and `linear_dynamic_int8` (weights
int8 per output channel and group of 128 inputs, a few outlier input channels kept fp32, packed
once by `pack_int8_weight`; activations quantised per row on each call to 8 bits between the
row's min and max; the s8 x s8 GEMM is AVX-512 VNNI's vpdpbusd at the "avx512" level when the
CPU has it, AVX2's vpmaddubsw on |w| and vpsignb'd activations (never saturating) otherwise, a
portable loop at "generic": the same bits on every path, chosen by `set_isa` like the rest). `linear_bf16` (weights bf16,
packed once by `pack_bf16_weight` in vdpbf16ps pair layout; activations rounded to bf16 per
call; fp32 accumulation) runs AVX-512 BF16's vdpbf16ps at the "avx512" level when the CPU has
it, else a scalar twin that rounds the same products in the same order (slow: for tests).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from vtpu import ops as _ops
from vtpu.counters import kernel_scope
from vtpu.kernels import _dense, _packed, _sparse

__all__ = [
    "ACTIVATIONS",
    "KernelInputError",
    "add",
    "add_layer_norm",
    "attention",
    "attention_packed",
    "amx_bf16_native",
    "amx_int8_native",
    "bf16_native",
    "bias_activation",
    "blas_library",
    "cpu_features",
    "dispatch_info",
    "gather_rows",
    "gemm",
    "gemm_int8",
    "isa",
    "layer_norm",
    "linear",
    "linear_int8",
    "linear_bf16",
    "linear_dynamic_int8",
    "linear_weight_int8",
    "pack_int8_weight",
    "quantize_int8_groups",
    "Int8GroupWeight",
    "Int8Weight",
    "int8_weight_bytes",
    "Bf16Weight",
    "pack_bf16_weight",
    "l2_normalize",
    "masked_mean_pool",
    "mul",
    "num_threads",
    "quantize_int8",
    "rms_norm",
    "scatter_rows",
    "set_isa",
    "softmax",
    "topk_similarity",
    "use_amx",
]


class KernelInputError(ValueError):
    """An argument a kernel cannot take; the message says which one and what to pass instead."""


ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}
_INT_MAX = 2**31 - 1
# Largest K for which an int8 dot product cannot overflow int32: K * 128 * 128 <= 2**31 - 1.
_INT8_MAX_K = _INT_MAX // (128 * 128)
# Bytes of the score block top-k similarity materialises per BLAS call.
_TOPK_BLOCK_BYTES = 8 << 20


def _threads_from_env() -> int:
    raw = os.environ.get("VTPU_NUM_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise KernelInputError(
                f"VTPU_NUM_THREADS={raw!r} is not a positive integer; unset it to use every CPU "
                "this process may run on"
            )
        return int(raw)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Chosen once per process, as the kernels' parallel loops expect a fixed team.
_NUM_THREADS = _threads_from_env()


# Below this many elements of work a kernel runs on the calling thread: waking the OpenMP team
# costs more than it saves, and on a busy machine a descheduled team member stalls the barrier.
_PARALLEL_MIN_WORK = 1 << 15


def num_threads() -> int:
    """Threads each parallel kernel uses (VTPU_NUM_THREADS, else the CPUs we may run on)."""
    return _NUM_THREADS


def _threads(work: int) -> int:
    return _NUM_THREADS if work >= _PARALLEL_MIN_WORK else 1


# ---- instruction sets ------------------------------------------------------------------------

_FEATURES: dict[str, bool] = {name: bool(v) for name, v in _dense.cpu_features().items()}


def cpu_features() -> dict[str, bool]:
    """The CPU's vector features that the OS also enables (CPUID + XGETBV), by name."""
    return dict(_FEATURES)


def _isa_supported(name: str) -> bool:
    avx2 = _FEATURES["avx2"] and _FEATURES["fma"]
    if name == "avx512":
        return avx2 and _FEATURES["avx512f"] and _FEATURES["avx512bw"] and _FEATURES["avx512vl"]
    return avx2 if name == "avx2" else name == "generic"


def _best_isa() -> str:
    return next(name for name in ("avx512", "avx2", "generic") if _isa_supported(name))


def isa() -> str:
    """The instruction set the kernels are using now: "avx512", "avx2" or "generic".

    At "avx512" only the packed Linear kernels (vtpu.kernels.packed), linear_dynamic_int8 (VNNI)
    and linear_bf16 (BF16) have AVX-512 bodies; the rest run their AVX2 bodies (dispatch_info()
    names each kernel's real path)."""
    level = _dense.get_level()
    return next(name for name, value in _LEVELS.items() if value == level)


def set_isa(name: str | None = None) -> str:
    """Use `name` ("generic", "avx2" or "avx512"), or the best this CPU supports when None;
    returns it.

    Process-wide: it changes the path of every thread's later kernel calls.
    """
    if name is None:
        name = _best_isa()
    if name not in _LEVELS:
        raise KernelInputError(
            f"unknown instruction set {name!r}; the kernels implement {sorted(_LEVELS)} "
            "(AMX runs under avx512 where the CPU has it; see use_amx)"
        )
    if not _isa_supported(name):
        need = "AVX-512 F+BW+VL" if name == "avx512" else "AVX2+FMA"
        raise KernelInputError(
            f"this CPU (or its OS) lacks {need}; use set_isa({_best_isa()!r}) or set_isa(None)"
        )
    # _simd.h's level is per extension module; _sparse only moves bytes: no ISA-specific code
    _dense.set_level(_LEVELS[name])
    _packed.set_level(_LEVELS[name])
    return name


set_isa()


# ---- validation ------------------------------------------------------------------------------


def _array(name: str, x: object, dtype: type, ndim: int | tuple[int, ...]) -> np.ndarray:
    """x as a C-contiguous array of `dtype`, copying only for layout, never converting dtype."""
    if not isinstance(x, np.ndarray):
        raise KernelInputError(
            f"{name} must be a numpy array of {np.dtype(dtype).name}, got {type(x).__name__}"
        )
    if x.dtype != dtype:
        raise KernelInputError(
            f"{name} has dtype {x.dtype}, the kernel computes in {np.dtype(dtype).name}: pass "
            f"{name}.astype(np.{np.dtype(dtype).name})"
        )
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in dims:
        want = " or ".join(str(d) for d in dims)
        raise KernelInputError(f"{name} must have {want} dimensions, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if value > _INT_MAX:
            raise KernelInputError(f"{name}={value} exceeds the BLAS limit of {_INT_MAX}")


def _out(
    name: str, out: np.ndarray | None, shape: tuple[int, ...], dtype: type, *inputs: np.ndarray
) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise KernelInputError(
            f"{name}: out must be a {np.dtype(dtype).name} array of shape {shape}, got {got}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise KernelInputError(f"{name}: out must be C-contiguous and writeable")
    for x in inputs:
        if np.may_share_memory(out, x):
            raise KernelInputError(
                f"{name}: out overlaps an input; pass a separate array or out=None"
            )
    return out


def _row_out(name: str, x: np.ndarray, out: np.ndarray | None, *others: np.ndarray) -> np.ndarray:
    """Row-wise kernels read a row fully before writing it, so out may be x itself."""
    if out is not None and isinstance(out, np.ndarray) and out is x:
        if not x.flags.writeable:
            raise KernelInputError(f"{name}: out is x, but x is read-only")
        return _out(name, out, x.shape, np.float32, *others)
    return _out(name, out, x.shape, np.float32, x, *others)


def _vector(name: str, v: object, n: int) -> np.ndarray:
    arr = _array(name, v, np.float32, 1)
    if arr.shape[0] != n:
        raise KernelInputError(f"{name} has length {arr.shape[0]}, expected {n} (the last axis)")
    return arr


def _activation(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise KernelInputError(
            f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation]


def _rows(x: np.ndarray) -> np.ndarray:
    """(..., N) viewed as (M, N) for the row-wise kernels."""
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


# ---- dense -----------------------------------------------------------------------------------


def gemm(
    a: np.ndarray,
    b: np.ndarray,
    *,
    trans_b: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """alpha * a @ b (or a @ b.T when trans_b) + beta * out, in float32 through BLAS."""
    a = _array("a", a, np.float32, 2)
    b = _array("b", b, np.float32, 2)
    m, k = a.shape
    n, kb = b.shape if trans_b else b.shape[::-1]
    if kb != k:
        b_desc = "b.T" if trans_b else "b"
        raise KernelInputError(
            f"gemm: a is {a.shape} but {b_desc} has {kb} rows; inner dimensions must match"
        )
    _check_dims(m=m, n=n, k=k)
    if beta != 0.0 and out is None:
        raise KernelInputError("gemm: beta != 0 accumulates into out, so pass out=")
    c = _out("gemm", out, (m, n), np.float32, a, b)
    if m == 0 or n == 0:
        return c
    if k == 0:
        c *= beta
        return c
    with kernel_scope(_ops.gemm(m, n, k)):
        _dense.gemm(a, b, c, bool(trans_b), float(alpha), float(beta))
    return c


def linear(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    activation: str = "none",
    *,
    trans_w: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """activation(x @ w + bias); w is (K, N), or (N, K) with trans_w (a PyTorch Linear weight).

    x may have leading batch axes: (..., K) -> (..., N). Bias and activation are one vectorised
    pass over the output after the BLAS call, not fused into the GEMM's inner loop.
    """
    act = _activation(activation)
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    w = _array("w", w, np.float32, 2)
    k = x.shape[-1]
    n, kw = w.shape if trans_w else w.shape[::-1]
    if kw != k:
        raise KernelInputError(
            f"linear: x has {k} features but w {'(N, K)' if trans_w else '(K, N)'} is {w.shape}; "
            + ("pass trans_w=False" if w.shape[0] == k and trans_w else "check the weight")
        )
    b = None if bias is None else _vector("bias", bias, n)
    x2 = _rows(x)
    m = x2.shape[0]
    _check_dims(m=m, n=n, k=k)
    inputs = (x, w) if b is None else (x, w, b)
    y = _out("linear", out, x.shape[:-1] + (n,), np.float32, *inputs)
    if y.size == 0:
        return y
    y2 = y.reshape(m, n)
    if k == 0:
        y2.fill(0.0)
        if b is not None or act:
            _dense.bias_act(y2, b, act, _threads(y2.size))
        return y
    ops = _ops.linear(m, n, k, bias=b is not None, activation=act != 0)
    with kernel_scope(ops):
        _dense.linear(x2, w, b, act, y2, bool(trans_w), _threads(y2.size))
    return y


def bias_activation(
    y: np.ndarray, bias: np.ndarray | None = None, activation: str = "none"
) -> np.ndarray:
    """y = activation(y + bias) in place over the last axis; returns y."""
    act = _activation(activation)
    if not isinstance(y, np.ndarray) or y.dtype != np.float32 or y.ndim < 1:
        raise KernelInputError("bias_activation: y must be a float32 array with at least 1 axis")
    if not y.flags.c_contiguous or not y.flags.writeable:
        raise KernelInputError("bias_activation works in place: y must be C-contiguous, writeable")
    b = None if bias is None else _vector("bias", bias, y.shape[-1])
    if b is not None and np.may_share_memory(y, b):
        raise KernelInputError("bias_activation: bias overlaps y; pass a copy of the bias")
    if y.size == 0 or (b is None and act == 0):
        return y
    with kernel_scope(y.size * ((b is not None) + (act != 0))):
        _dense.bias_act(_rows(y), b, act, _threads(y.size))
    return y


def _eps(eps: float) -> float:
    if not (eps >= 0.0 and np.isfinite(eps)):
        raise KernelInputError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def layer_norm(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis (out may be x)."""
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    n = x.shape[-1]
    g, b = _vector("gamma", gamma, n), _vector("beta", beta, n)
    y = _row_out("layer_norm", x, out, g, b)
    if x.size:
        with kernel_scope(_ops.PER_ELEMENT["layer_norm"] * x.size):
            _dense.layer_norm(_rows(x), g, b, _eps(eps), _rows(y), _threads(x.size))
    return y


def add_layer_norm(
    x: np.ndarray,
    residual: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """layer_norm(x + residual) in one pass over the rows (a transformer's post-norm residual);
    out may be x or residual."""
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    r = _array("residual", residual, np.float32, tuple(range(1, 9)))
    if r.shape != x.shape:
        raise KernelInputError(
            f"add_layer_norm: residual is {r.shape} but x is {x.shape}; they must match"
        )
    n = x.shape[-1]
    g, b = _vector("gamma", gamma, n), _vector("beta", beta, n)
    if out is not None and isinstance(out, np.ndarray) and (out is x or out is r):
        y = _row_out("add_layer_norm", out, out, g, b)
    else:
        y = _out("add_layer_norm", out, x.shape, np.float32, x, r, g, b)
    if x.size:
        with kernel_scope(_ops.PER_ELEMENT["add_layer_norm"] * x.size):
            _dense.add_layer_norm(_rows(x), _rows(r), g, b, _eps(eps), _rows(y), _threads(x.size))
    return y


def masked_mean_pool(
    x: np.ndarray, lengths: np.ndarray, *, out: np.ndarray | None = None
) -> np.ndarray:
    """(B, S, D) -> (B, D): the mean of each sequence's first lengths[b] rows (sentence
    embeddings' mean pooling over the attention mask; a sequence of length 0 pools to zeros)."""
    x = _array("x", x, np.float32, 3)
    bsz, seq, d = x.shape
    lens = np.asarray(lengths)
    if lens.shape != (bsz,) or (bsz and lens.dtype.kind not in "iu"):
        raise KernelInputError(
            f"masked_mean_pool: lengths must be integers of shape ({bsz},), got {lens.dtype} "
            f"{lens.shape}"
        )
    if bsz and (lens.min() < 0 or lens.max() > seq):
        raise KernelInputError(f"masked_mean_pool: lengths must lie in [0, {seq}], got {lens}")
    y = _out("masked_mean_pool", out, (bsz, d), np.float32, x)
    if y.size:
        lens32 = lens.astype(np.int32)
        with kernel_scope(_ops.masked_mean_pool(int(lens32.sum()), bsz, d)):
            _dense.masked_mean_pool(x.reshape(-1, d), lens32, seq, y, _threads(x.size))
    return y


def l2_normalize(x: np.ndarray, eps: float = 1e-12, *, out: np.ndarray | None = None) -> np.ndarray:
    """x / max(||x||, eps) over the last axis (PyTorch's F.normalize; out may be x)."""
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    y = _row_out("l2_normalize", x, out)
    if x.size:
        with kernel_scope(_ops.PER_ELEMENT["l2_normalize"] * x.size):
            _dense.l2_normalize(_rows(x), _eps(eps), _rows(y), _threads(x.size))
    return y


def rms_norm(
    x: np.ndarray, gamma: np.ndarray, eps: float = 1e-6, *, out: np.ndarray | None = None
) -> np.ndarray:
    """x / sqrt(mean(x**2) + eps) * gamma over the last axis (Qwen3/Llama RMSNorm; out may be x)."""
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    g = _vector("gamma", gamma, x.shape[-1])
    y = _row_out("rms_norm", x, out, g)
    if x.size:
        with kernel_scope(_ops.PER_ELEMENT["rms_norm"] * x.size):
            _dense.rms_norm(_rows(x), g, _eps(eps), _rows(y), _threads(x.size))
    return y


def softmax(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis. A row that is all -inf gives zeros (out may be x)."""
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    y = _row_out("softmax", x, out)
    if x.size:
        with kernel_scope(_ops.PER_ELEMENT["softmax"] * x.size):
            _dense.softmax(_rows(x), _rows(y), _threads(x.size))
    return y


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    key_lengths: np.ndarray | None = None,
    scale: float | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """softmax(q @ k.T * scale) @ v per batch and head, without materialising the score matrix.

    q is (B, H, Sq, D); k and v are (B, Hkv, Sk, D) with H a multiple of Hkv (grouped-query
    attention: head h reads kv head h // (H / Hkv)). `causal` lets query i see keys up to
    i + Sk - Sq (queries are the last Sq positions). `key_lengths` (B,) masks padded keys: batch
    b sees only its first key_lengths[b] keys. A query that sees no key gets zeros. scale defaults
    to 1/sqrt(D).
    """
    q = _array("q", q, np.float32, 4)
    k = _array("k", k, np.float32, 4)
    v = _array("v", v, np.float32, 4)
    bsz, heads, sq, d = q.shape
    if k.shape != v.shape:
        raise KernelInputError(f"attention: k is {k.shape} but v is {v.shape}; they must match")
    kb, kv_heads, sk, kd = k.shape
    if kb != bsz or kd != d:
        raise KernelInputError(
            f"attention: q is {q.shape} and k is {k.shape}; batch (axis 0) and head size "
            "(axis 3) must match"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise KernelInputError(
            f"attention: q has {heads} heads, k/v have {kv_heads}; q's must be a multiple"
        )
    if key_lengths is None:
        lengths = np.full(bsz, sk, dtype=np.int32)
    else:
        kl = np.asarray(key_lengths)
        if kl.shape != (bsz,) or kl.dtype.kind not in "iu":
            raise KernelInputError(
                f"attention: key_lengths must be integers of shape ({bsz},), got {kl.dtype} "
                f"{kl.shape}"
            )
        if bsz and (kl.min() < 0 or kl.max() > sk):
            raise KernelInputError(f"attention: key_lengths must lie in [0, {sk}], got {kl}")
        lengths = kl.astype(np.int32)
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d else 1.0
    if not np.isfinite(scale):
        raise KernelInputError(f"attention: scale must be finite, got {scale!r}")
    _check_dims(rows=bsz * heads * sq, keys=bsz * kv_heads * sk)
    y = _out("attention", out, q.shape, np.float32, q, k, v)
    if y.size == 0:
        return y
    scores = _ops.attention_scores(sq, sk, heads=heads, causal=causal, key_lengths=lengths)
    with kernel_scope(_ops.attention(scores, bsz * heads * sq, d)):
        _dense.attention(
            q.reshape(-1, d),
            k.reshape(-1, d),
            v.reshape(-1, d),
            lengths,
            bsz,
            heads,
            kv_heads,
            sq,
            sk,
            bool(causal),
            float(scale),
            y.reshape(-1, d),
            _threads(scores * d),
        )
    return y


def attention_packed(
    qkv: np.ndarray,
    heads: int,
    *,
    key_lengths: np.ndarray | None = None,
    scale: float | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Self-attention of (B, S, 3 * heads * D) fused QKV projections -> (B, S, heads * D).

    Each position's query, key and value lie side by side (query heads first, then keys, then
    values), as one GEMM against concatenated weights produces them; the result keeps the
    heads side by side, ready for the output projection. No head split or merge is copied.
    `key_lengths` (B,) masks padded keys as in attention(); scale defaults to 1/sqrt(D).
    """
    qkv = _array("qkv", qkv, np.float32, 3)
    bsz, seq, width = qkv.shape
    if isinstance(heads, bool) or not isinstance(heads, int | np.integer) or heads < 1:
        raise KernelInputError(f"attention_packed: heads must be a positive integer, got {heads!r}")
    if width % (3 * heads):
        raise KernelInputError(
            f"attention_packed: the last axis ({width}) must be 3 x heads ({heads}) x head size"
        )
    d = width // (3 * heads)
    if key_lengths is None:
        lengths = np.full(bsz, seq, dtype=np.int32)
    else:
        kl = np.asarray(key_lengths)
        if kl.shape != (bsz,) or (bsz and kl.dtype.kind not in "iu"):
            raise KernelInputError(
                f"attention_packed: key_lengths must be integers of shape ({bsz},), got "
                f"{kl.dtype} {kl.shape}"
            )
        if bsz and (kl.min() < 0 or kl.max() > seq):
            raise KernelInputError(
                f"attention_packed: key_lengths must lie in [0, {seq}], got {kl}"
            )
        lengths = kl.astype(np.int32)
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d else 1.0
    if not np.isfinite(scale):
        raise KernelInputError(f"attention_packed: scale must be finite, got {scale!r}")
    _check_dims(rows=bsz * seq, width=width)
    y = _out("attention_packed", out, (bsz, seq, heads * d), np.float32, qkv)
    if y.size == 0:
        return y
    scores = _ops.attention_scores(seq, seq, heads=heads, key_lengths=lengths)
    with kernel_scope(_ops.attention(scores, bsz * heads * seq, d)):
        _dense.attention_packed(
            qkv.reshape(-1, width),
            lengths,
            bsz,
            seq,
            heads,
            float(scale),
            y.reshape(-1, heads * d),
            _threads(scores * d),
        )
    return y


def gemm_int8(
    a: np.ndarray, b: np.ndarray, *, trans_b: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """a @ b (or a @ b.T) for int8 inputs, exact in int32: equals the integer reference."""
    a = _array("a", a, np.int8, 2)
    b = _array("b", b, np.int8, 2)
    m, k = a.shape
    n, kb = b.shape if trans_b else b.shape[::-1]
    if kb != k:
        raise KernelInputError(
            f"gemm_int8: a is {a.shape} but {'b.T' if trans_b else 'b'} has {kb} rows; inner "
            "dimensions must match"
        )
    if k > _INT8_MAX_K:
        raise KernelInputError(
            f"gemm_int8: K={k} could overflow int32 accumulators; split K into chunks of at "
            f"most {_INT8_MAX_K} and add the partial results"
        )
    c = _out("gemm_int8", out, (m, n), np.int32, a, b)
    if c.size == 0:
        return c
    if k == 0:
        c.fill(0)
        return c
    # the kernel reads B as rows of K (dot products along contiguous memory)
    bt = b if trans_b else np.ascontiguousarray(b.T)
    with kernel_scope(_ops.gemm(m, n, k)):
        _dense.gemm_int8(a, bt, c, _threads(m * n * k // 16))
    return c


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation: (q int8 (M, K), scale float32 (M,)), x ~= q * scale.

    Each row's largest magnitude maps to 127 (-128 is never produced, so negation is safe); an
    all-zero row gets scale 1. Use it for activations per call and for weights once.
    """
    x = _array("x", x, np.float32, 2)
    if not np.isfinite(x).all():
        raise KernelInputError("quantize_int8: x must be finite (no NaN or inf)")
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    with kernel_scope(_ops.PER_ELEMENT["quantize_int8"] * x.size):
        q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def linear_int8(
    xq: np.ndarray,
    x_scale: np.ndarray,
    wq: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None = None,
    activation: str = "none",
) -> np.ndarray:
    """activation((xq * x_scale) @ (wq * w_scale).T + bias) from quantize_int8 outputs.

    wq is (N, K), a PyTorch Linear weight quantised per output row; the int8 GEMM is exact and
    only the per-row/per-column scales round, once, in float32.
    """
    act = _activation(activation)
    xq = _array("xq", xq, np.int8, 2)
    wq = _array("wq", wq, np.int8, 2)
    m, n = xq.shape[0], wq.shape[0]
    xs = _vector("x_scale", x_scale, m) if m else np.zeros(0, np.float32)
    ws = _vector("w_scale", w_scale, n) if n else np.zeros(0, np.float32)
    b = None if bias is None else _vector("bias", bias, n)
    acc = gemm_int8(xq, wq, trans_b=True)
    y = acc.astype(np.float32)
    y *= xs[:, None]
    y *= ws[None, :]
    return bias_activation(y, b, activation) if (b is not None or act) else y


@dataclass(frozen=True)
class Int8Weight:
    """A Linear weight W (N, K) quantised once for linear_dynamic_int8.

    The input channels in `outliers` stay fp32 (outlier_w = W[:, outliers].T); the rest are int8,
    symmetric per output channel and group of `group` input channels:
    W[j, k] ~= q[j, k] * scale[k // group, j], q in [-127, 127], packed for the s8 x s8 kernel."""

    n: int
    k: int
    group: int
    packed: np.ndarray  # int8, (ceil(N/8) panels, ceil(K/4) quads, 8 columns, 4) flattened
    scale: np.ndarray  # float32 (groups, N padded to 8)
    gsum: np.ndarray  # int32 (groups, N padded to 8): 128 * each group's sum of q (VNNI's offset)
    wsum: np.ndarray  # float32 (N,): sum_k q[j, k] * scale, the activation zero point's share
    keep: np.ndarray  # uint8 (K,): 1 for the int8 channels, 0 for the fp32 outliers
    outliers: np.ndarray  # int64 (T,)
    outlier_w: np.ndarray  # float32 (T, N)

    @property
    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.packed,
                self.scale,
                self.gsum,
                self.wsum,
                self.keep,
                self.outliers,
                self.outlier_w,
            )  # fmt: skip
        )


def int8_weight_bytes(n: int, k: int, *, group: int = 128, outliers: int = 0) -> int:
    """Bytes of pack_int8_weight's result for an (N, K) weight, without packing it."""
    kq, np_ = -(-k // 4), -(-n // 8) * 8
    groups = -(-kq // (group // 4))
    return np_ * kq * 4 + groups * np_ * 8 + 4 * n + k + outliers * (8 + 4 * n)


def pack_int8_weight(
    w: np.ndarray,
    *,
    trans_w: bool = False,
    group: int = 128,
    outliers: np.ndarray | list[int] | None = None,
) -> Int8Weight:
    """Quantise a float32 Linear weight to int8 per output channel and group of `group` input
    channels (a multiple of 4) and pack it, once; the input channels listed in `outliers`
    stay fp32 (the few channels where a transformer's activations are far larger than the
    rest: kept out of the int8 part, they no longer set every row's quantisation step).

    w is (N, K) as PyTorch stores it, or (K, N) (the layout `linear` reads) with trans_w=True.
    """
    w = _array("w", w, np.float32, 2)
    if trans_w:
        w = np.ascontiguousarray(w.T)
    if not np.isfinite(w).all():
        raise KernelInputError("pack_int8_weight: w must be finite (no NaN or inf)")
    if isinstance(group, bool) or not isinstance(group, int | np.integer) or group < 4 or group % 4:
        raise KernelInputError(
            f"pack_int8_weight: group must be a positive multiple of 4, got {group!r}"
        )
    n, k = w.shape
    if group > _INT8_MAX_K:
        raise KernelInputError(
            f"pack_int8_weight: group={group} could overflow int32 accumulators; at most "
            f"{_INT8_MAX_K}"
        )
    idx = np.zeros(0, np.int64) if outliers is None else np.asarray(outliers)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise KernelInputError("pack_int8_weight: outliers must be a 1-D list of channel indices")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= k or np.unique(idx).size != idx.size):
        raise KernelInputError(
            f"pack_int8_weight: outliers must be distinct input channels in [0, {k})"
        )
    keep = np.ones(k, np.uint8)
    keep[idx] = 0
    outlier_w = np.ascontiguousarray(w[:, idx].T)
    kq, np_ = -(-k // 4), -(-n // 8) * 8
    gq = group // 4
    groups = -(-kq // gq)
    padded = np.zeros((np_, groups * group), np.float32)
    padded[:n, :k] = w * keep
    blocks = padded.reshape(np_, groups, group)
    amax = np.abs(blocks).max(axis=2)  # (np_, groups)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    with kernel_scope(_ops.PER_ELEMENT["quantize_int8"] * w.size):
        q = np.clip(np.rint(blocks / scale[:, :, None]), -127, 127).astype(np.int8)
    gsum = (128 * q.astype(np.int32).sum(axis=2)).T.astype(np.int32)
    wsum = (q.astype(np.float64) * scale[:, :, None]).sum(axis=(1, 2))[:n].astype(np.float32)
    q = q.reshape(np_, groups * group)[:, : kq * 4]
    packed = q.reshape(np_ // 8, 8, kq, 4).transpose(0, 2, 1, 3)
    return Int8Weight(
        n, k, int(group), np.ascontiguousarray(packed).reshape(-1),
        np.ascontiguousarray(scale.T), np.ascontiguousarray(gsum), wsum, keep, idx, outlier_w,
    )  # fmt: skip


def _prepacked_linear(
    name: str,
    x: object,
    w: object,
    kind: type,
    bias: object,
    out: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The checks a linear over a pre-packed weight makes before its kernel: w is a `kind`, x is
    float32 with w.k features (any leading batch axes), bias has w.n entries, and out fits and
    overlaps nothing it reads. NaN and inf in x the kernels find in their own pass over it (the
    int8 quantiser, the bf16 conversion), and refuse. Returns (x as rows, bias, y)."""
    if not isinstance(w, kind):
        what = {
            Int8Weight: "an Int8Weight from pack_int8_weight",
            Bf16Weight: "a Bf16Weight from pack_bf16_weight",
        }[kind]
        raise KernelInputError(f"w must be {what}, got {type(w).__name__}")
    x = _array("x", x, np.float32, tuple(range(1, 9)))
    if x.shape[-1] != w.k:
        raise KernelInputError(f"{name}: x has {x.shape[-1]} features but the weight takes {w.k}")
    b = None if bias is None else _vector("bias", bias, w.n)
    x2 = _rows(x)
    _check_dims(m=x2.shape[0], n=w.n, k=w.k)
    inputs = (x,) if b is None else (x, b)
    y = _out(name, out, x.shape[:-1] + (w.n,), np.float32, *inputs)
    return x2, b, y


def linear_dynamic_int8(
    x: np.ndarray,
    w: Int8Weight,
    bias: np.ndarray | None = None,
    activation: str = "none",
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """activation(x @ W.T + bias) with W an Int8Weight: dynamic int8 quantisation.

    Each row of x is quantised per call to 8 bits over its int8 channels, asymmetrically: the
    255 levels span [min, max] of the row (centre and step per row), so a GELU output, mostly
    positive, loses no bit to a sign it rarely has. The s8 x s8 GEMM is exact per weight group
    and the same bits on every path (generic, AVX2 vpmaddubsw with vpsignb, AVX-512 VNNI
    vpdpbusd); the outlier channels are added in fp32. x may have leading batch axes.
    """
    act = _activation(activation)
    x2, b, y = _prepacked_linear("linear_dynamic_int8", x, w, Int8Weight, bias, out)
    if y.size == 0:
        return y
    m = x2.shape[0]
    if not _amx_checked["int8"] and _dense.amx_int8_active():
        _check_amx("int8")
    ops = _ops.linear(m, w.n, w.k, bias=b is not None, activation=act != 0)
    kp = 4 * -(-w.k // 4)
    with kernel_scope(ops):
        nonfinite = _dense.linear_dynamic_int8(
            x2, w.packed, kp, w.group // 4, w.scale, w.gsum, w.wsum, w.keep, w.outliers,
            w.outlier_w, b, act, y.reshape(m, w.n), _threads(y.size),
        )  # fmt: skip
    if nonfinite:
        raise KernelInputError(
            f"linear_dynamic_int8: x must be finite (no NaN or inf): {nonfinite} of its {m} rows "
            "are not"
        )
    return y


@dataclass(frozen=True)
class Bf16Weight:
    """A Linear weight W (N, K) as bf16 bits for linear_bf16, packed for vdpbf16ps: panels of 16
    output columns, each pair of inputs (w[j, 2p], w[j, 2p + 1]) side by side per column."""

    n: int
    k: int
    packed: np.ndarray  # uint16, (ceil(N/16) panels, ceil(K/2) pairs, 16 columns, 2) flattened

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def bf16_native() -> bool:
    """Whether linear_bf16 runs vdpbf16ps (or AMX, amx_bf16_native) now: the CPU has AVX-512
    BF16 and the level is "avx512"; otherwise it runs its scalar twin."""
    return _dense.bf16_active()


def amx_bf16_native() -> bool:
    """Whether linear_bf16 runs on AMX tiles now, for K a multiple of 32 (other K: vdpbf16ps):
    the CPU has AMX-BF16, Linux granted this process the tile state, the level is "avx512",
    use_amx has not turned it off, and the first call's self-check passed (or is to come)."""
    return _dense.amx_bf16_active()


def amx_int8_native() -> bool:
    """Whether linear_dynamic_int8 runs on AMX tiles now, for K and its weight groups multiples
    of 64 (otherwise VNNI): as amx_bf16_native, with AMX-INT8 and AVX-512 VNNI."""
    return _dense.amx_int8_active()


def use_amx(enabled: bool = True) -> bool:
    """Let the AMX kernels run where the CPU has them (the default) or not, process-wide;
    returns whether either runs now."""
    _dense.set_amx(bool(enabled))
    for kind in _amx_checked:
        _amx_checked[kind] = not enabled
    return amx_bf16_native() or amx_int8_native()


# Whether each AMX path passed its self-check (done at its kernel's first call on AMX).
_amx_checked = {"bf16": False, "int8": False}


def _check_amx(kind: str) -> None:
    """Run a small product on AMX and on the AVX-512 path it replaces; AMX serves only if the
    two agree (bit for bit for int8, to fp32 rounding for bf16). These paths were written on
    machines without AMX: a wrong result turns AMX off instead of reaching a customer."""
    _amx_checked[kind] = True
    rng = np.random.default_rng(20261130)
    x = rng.standard_normal((37, 128), dtype=np.float32)  # rows and columns off the tile grid
    w = rng.standard_normal((40, 128), dtype=np.float32)
    if kind == "bf16":
        wb = pack_bf16_weight(w)
        run = lambda y: _dense.linear_bf16(x, wb.packed, wb.k // 2, None, 0, y, 1)  # noqa: E731
    else:
        wq = pack_int8_weight(w, group=64, outliers=[3])
        run = lambda y: _dense.linear_dynamic_int8(  # noqa: E731
            x, wq.packed, wq.k, 16, wq.scale, wq.gsum, wq.wsum, wq.keep, wq.outliers,
            wq.outlier_w, None, 0, y, 1,
        )  # fmt: skip
    on_amx, reference = np.empty((37, 40), np.float32), np.empty((37, 40), np.float32)
    run(on_amx)
    _dense.set_amx(False)
    run(reference)
    same = (
        np.array_equal(on_amx, reference)
        if kind == "int8"
        else np.allclose(on_amx, reference, rtol=1e-5, atol=1e-4)
    )
    if same:
        _dense.set_amx(True)
    else:
        for other in _amx_checked:  # one switch turns both off: no later check turns it back on
            _amx_checked[other] = True
        logging.getLogger(__name__).error(
            "AMX-%s self-check failed (max difference %.3g): AMX is off, the AVX-512 paths serve",
            kind.upper(),
            float(np.abs(on_amx - reference).max()),
        )


def pack_bf16_weight(w: np.ndarray, *, trans_w: bool = False) -> Bf16Weight:
    """Round a float32 Linear weight to bf16 (to nearest, ties to even; the rounding of
    vtpu.kernels.packed) and pack it for linear_bf16, once.

    w is (N, K) as PyTorch stores it, or (K, N) (the layout `linear` reads) with trans_w=True.
    """
    from vtpu.kernels import packed as _packed_weights  # imports this module: import it late

    w = _array("w", w, np.float32, 2)
    if trans_w:
        w = np.ascontiguousarray(w.T)
    n, k = w.shape
    bits = _packed_weights.pack(w, "bf16").data  # refuses NaN, inf and bf16 overflow
    kh, np_ = -(-k // 2), -(-n // 16) * 16
    padded = np.zeros((np_, 2 * kh), dtype=np.uint16)
    padded[:n, :k] = bits
    packed = padded.reshape(np_ // 16, 16, kh, 2).transpose(0, 2, 1, 3)
    return Bf16Weight(n, k, np.ascontiguousarray(packed).reshape(-1))


def linear_bf16(
    x: np.ndarray,
    w: Bf16Weight,
    bias: np.ndarray | None = None,
    activation: str = "none",
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """activation(bf16(x) @ W.T + bias) with W a Bf16Weight; products of bf16 values summed in
    fp32. x is rounded to bf16 (to nearest, ties to even) on every call; denormal bf16 inputs
    count as zero, as vdpbf16ps treats them. x may have leading batch axes.

    Where it pays: vdpbf16ps does 32 multiply-adds per instruction against 16 for an fp32 FMA,
    so on AMD Zen 4 (whose 512-bit units run both at one per cycle) it beats fp32; on the Intel
    Xeon of docs PERFORMANCE.md (two 512-bit FMA ports) vdpbf16ps ran slower than fp32 FMA and
    bf16 saves memory, not time. Without AVX-512 BF16 (or below the "avx512" level) the scalar
    twin runs: correct, slow, meant for tests.
    """
    act = _activation(activation)
    x2, b, y = _prepacked_linear("linear_bf16", x, w, Bf16Weight, bias, out)
    if y.size == 0:
        return y
    m = x2.shape[0]
    if w.k == 0:
        y.fill(0.0)
        if b is not None or act:
            _dense.bias_act(y.reshape(m, w.n), b, act, _threads(y.size))
        return y
    if not _amx_checked["bf16"] and _dense.amx_bf16_active():
        _check_amx("bf16")
    ops = _ops.linear(m, w.n, w.k, bias=b is not None, activation=act != 0)
    with kernel_scope(ops):
        unfit = _dense.linear_bf16(
            x2, w.packed, -(-w.k // 2), b, act, y.reshape(m, w.n), _threads(y.size)
        )
    if unfit:  # the kernel's conversion found them; say which kind
        if not np.isfinite(x2).all():
            raise KernelInputError("linear_bf16: x must be finite (no NaN or inf)")
        raise KernelInputError(
            "linear_bf16: x holds a value beyond bf16's range (|x| > 3.39e38); use linear()"
        )
    return y


@dataclass(frozen=True)
class Int8GroupWeight:
    """A (K, N) weight stored as int8 for linear_weight_int8: each output channel n has its own
    symmetric scale per group of `group` input rows, W[k, n] ~= q[k, n] * scale[k // group, n]."""

    q: np.ndarray  # int8 (K, N), in [-127, 127]
    scale: np.ndarray  # float32 (ceil(K / group), N)
    group: int

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize_int8_groups(w: np.ndarray, group: int = 32) -> Int8GroupWeight:
    """Quantise a (K, N) float32 weight (the layout `linear` reads) to int8, symmetric per
    output channel and per group of `group` input rows; the largest magnitude maps to 127."""
    w = _array("w", w, np.float32, 2)
    if isinstance(group, bool) or not isinstance(group, int | np.integer) or group < 1:
        raise KernelInputError(
            f"quantize_int8_groups: group must be a positive integer, got {group!r}"
        )
    if not np.isfinite(w).all():
        raise KernelInputError("quantize_int8_groups: w must be finite (no NaN or inf)")
    k, n = w.shape
    groups = -(-k // group)
    padded = np.zeros((groups * group, n), np.float32)
    padded[:k] = w
    amax = np.abs(padded.reshape(groups, group, n)).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.rint(padded.reshape(groups, group, n) / scale[:, None, :]).reshape(-1, n)[:k]
    with kernel_scope(_ops.PER_ELEMENT["quantize_int8"] * w.size):
        q = np.ascontiguousarray(np.clip(q, -127, 127).astype(np.int8))
    return Int8GroupWeight(q, scale, int(group))


def linear_weight_int8(
    x: np.ndarray,
    w: Int8GroupWeight,
    bias: np.ndarray | None = None,
    activation: str = "none",
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """activation(x @ W + bias) with W an Int8GroupWeight: weight-only int8, fp32 activations.

    The weight is widened to fp32 once per call (a parallel pass over K x N, small next to the
    M x N x K GEMM of a batch) and multiplied through BLAS as in linear(); what it saves is
    resident memory (1.125 bytes per weight instead of 4 with groups of 32), not arithmetic.
    """
    if not isinstance(w, Int8GroupWeight):
        raise KernelInputError(
            f"w must be an Int8GroupWeight from quantize_int8_groups, got {type(w).__name__}"
        )
    k, n = w.q.shape
    wide = np.empty((k, n), np.float32)
    if wide.size:
        with kernel_scope(wide.size):
            _dense.dequantize_int8_groups(w.q, w.scale, w.group, wide, _threads(wide.size))
    return linear(x, wide, bias, activation, out=out)


def topk_similarity(
    queries: np.ndarray, keys: np.ndarray, k: int, *, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar keys for each query: (indices int64 (Q, k), scores float32 (Q, k)).

    metric is "cosine" (a zero vector scores 0 against everything) or "dot". Results are sorted
    by score, best first; equal scores list the lower key index first.
    """
    queries = _array("queries", queries, np.float32, (1, 2))
    keys = _array("keys", keys, np.float32, 2)
    single = queries.ndim == 1
    if single:
        queries = queries[None, :]
    nq, d = queries.shape
    nk, kd = keys.shape
    if kd != d:
        raise KernelInputError(
            f"topk_similarity: queries have {d} dimensions but keys have {kd}; they must match"
        )
    if metric not in ("cosine", "dot"):
        raise KernelInputError(f"topk_similarity: metric must be 'cosine' or 'dot', not {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= nk:
        raise KernelInputError(f"topk_similarity: k must be an integer in [1, {nk}], got {k!r}")
    if not (np.isfinite(queries).all() and np.isfinite(keys).all()):
        raise KernelInputError("topk_similarity: queries and keys must be finite (no NaN or inf)")
    _check_dims(queries=nq, keys=nk, dims=d)
    k = int(k)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    if nq and d:
        block = max(64, min(nk, _TOPK_BLOCK_BYTES // (4 * nq)))
        scratch = np.empty((nq, block), dtype=np.float32)
        ops = _ops.topk_similarity(nq, nk, d, cosine=metric == "cosine")
        q_inv = k_inv = None
        if metric == "cosine":
            q_inv = np.empty(nq, dtype=np.float32)
            k_inv = np.empty(nk, dtype=np.float32)
        with kernel_scope(ops):
            if metric == "cosine":
                _dense.inverse_norms(queries, q_inv, _threads(queries.size))
                _dense.inverse_norms(keys, k_inv, _threads(keys.size))
            _dense.topk_similarity(
                queries, keys, q_inv, k_inv, scratch, best_s, best_i, _threads(nq * nk)
            )
    elif nq:  # zero-dimensional vectors: every score is 0, so the first k keys win
        best_s.fill(0.0)
        best_i[:] = np.arange(k)
    if single:
        return best_i[0], best_s[0]
    return best_i, best_s


# ---- sparse / memory -------------------------------------------------------------------------


def _plain_table(name: str, table: object) -> None:
    if not isinstance(table, np.ndarray) or table.ndim < 1:
        raise KernelInputError(f"{name}: table must be a numpy array with at least 1 axis")
    if table.dtype.hasobject:
        raise KernelInputError(f"{name}: table holds Python objects; use a numeric dtype")


def _byte_rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).view(np.uint8)


def _index(name: str, index: object, limit: int) -> np.ndarray:
    idx = np.asarray(index)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise KernelInputError(f"{name}: index must be a 1-D array of integers, got {idx.dtype}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= limit):
        bad = idx[(idx < 0) | (idx >= limit)][0]
        raise KernelInputError(f"{name}: index {bad} is outside the table's {limit} rows")
    return idx


def gather_rows(
    table: np.ndarray, index: np.ndarray, *, out: np.ndarray | None = None
) -> np.ndarray:
    """table[index] for a C-contiguous table of any dtype (an embedding lookup)."""
    _plain_table("gather_rows", table)
    if not table.flags.c_contiguous:
        raise KernelInputError("gather_rows: table must be C-contiguous (np.ascontiguousarray)")
    idx = _index("gather_rows", index, table.shape[0])
    y = _out("gather_rows", out, (idx.size,) + table.shape[1:], table.dtype, table)
    if y.size == 0:
        return y
    with kernel_scope(0):
        _sparse.gather_rows(_byte_rows(table), idx, _byte_rows(y), _threads(y.size))
    return y


def scatter_rows(table: np.ndarray, index: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """table[index] = rows in place (the last of repeated indices wins); returns table."""
    _plain_table("scatter_rows", table)
    if not table.flags.c_contiguous or not table.flags.writeable:
        raise KernelInputError("scatter_rows works in place: table must be C-contiguous, writeable")
    idx = _index("scatter_rows", index, table.shape[0])
    want = (idx.size,) + table.shape[1:]
    if not isinstance(rows, np.ndarray) or rows.dtype != table.dtype or rows.shape != want:
        got = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows)
        raise KernelInputError(f"scatter_rows: rows must be {table.dtype} {want}, got {got}")
    if np.may_share_memory(table, rows):
        rows = rows.copy()
    rows = np.ascontiguousarray(rows)
    if rows.size == 0:
        return table
    with kernel_scope(0):
        _sparse.scatter_rows(_byte_rows(rows), idx, _byte_rows(table))
    return table


def _elementwise(name: str, ufunc: np.ufunc, a: object, b: object, out: np.ndarray | None):
    a = _array("a", a, np.float32, (1, 2))
    b = _array("b", b, np.float32, (1, 2))
    if b.shape != a.shape and not (a.ndim == 2 and b.shape == (a.shape[1],)):
        raise KernelInputError(
            f"{name}: b is {b.shape} but a is {a.shape}; b must have a's shape or be a row of "
            f"{a.shape[-1]} values broadcast over a's rows"
        )
    y = _out(name, out, a.shape, np.float32)  # ufuncs handle out aliasing an input
    # numpy's ufunc loops are already vectorised, GIL-free and memory-bound here: a Cython twin
    # would add code, not speed.
    with kernel_scope(_ops.PER_ELEMENT[name] * a.size):
        ufunc(a, b, out=y)
    return y


def add(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """a + b for float32 arrays of one shape, or b a row vector added to every row of a."""
    return _elementwise("add", np.add, a, b, out)


def mul(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """a * b elementwise, with the same shapes as add()."""
    return _elementwise("mul", np.multiply, a, b, out)


def blas_library() -> str:
    """The BLAS library this process really loaded for scipy (from /proc/self/maps), else the
    one scipy was built against (scipy.show_config), else "unknown BLAS"."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        paths = set()
    for marker, name in (("openblas", "OpenBLAS"), ("mkl_rt", "MKL"), ("libmkl", "MKL"),
                         ("blis", "BLIS"), ("flexiblas", "FlexiBLAS"), ("libblas", "reference BLAS")):  # fmt: skip
        found = sorted(p for p in paths if marker in p.rsplit("/", 1)[-1].lower())
        if found:
            return f"{name} ({found[0].rsplit('/', 1)[-1]}, loaded)"
    try:
        import scipy

        config = scipy.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')} (scipy build config)".replace("  ", " ")
    except Exception:
        return "unknown BLAS"


def dispatch_info() -> dict[str, str]:
    """Which implementation each kernel uses on this CPU (for `vtpu info` and the bench): the
    vector path is the one the kernels run now (`isa()`), not the CPU's widest ISA."""
    from vtpu.kernels import packed  # imports this module: import it late

    # the rest of _dense has no AVX-512 bodies (linear_dynamic_int8 and linear_bf16 are below)
    vector = "avx2" if isa() == "avx512" else isa()
    blas = f"BLAS sgemm (scipy.linalg.cython_blas, {blas_library()})"
    return {
        "gemm": blas,
        "linear": f"{blas} + {vector} bias/activation pass",
        "bias_activation": vector,
        "layer_norm": vector,
        "add_layer_norm": vector,
        "masked_mean_pool": "scalar loop (auto-vectorised), OpenMP over sequences",
        "l2_normalize": vector,
        "rms_norm": vector,
        "softmax": vector,
        "attention": f"{vector} fused QK, softmax and PV per (batch, head) (no BLAS)",
        "attention_packed": f"{vector} as attention, reading fused QKV rows in place",
        "gemm_int8": vector,
        "linear_weight_int8": f"int8 -> fp32 widening pass (OpenMP) + {blas}",
        "linear_dynamic_int8": (
            "AMX-INT8 (tdpbusd, 16 x 32 tiles per weight group) where K and the groups are"
            " multiples of 64, else avx512 VNNI, OpenMP over rows"
            if amx_int8_native()
            else "avx512 VNNI s8 x s8 as u8 + 128 (vpdpbusd), OpenMP over rows"
            if isa() == "avx512" and _FEATURES["avx512_vnni"]
            else "avx2 s8 x s8 (vpsignb + vpmaddubsw + vpmaddwd), OpenMP over rows"
            if vector == "avx2"
            else "generic s8 x s8 loop, OpenMP over rows"
        ),
        "linear_bf16": (
            "AMX-BF16 (tdpbf16ps, 32x32 tiles kept over K) where K % 32 == 0, else avx512 BF16"
            " (vdpbf16ps), OpenMP over rows"
            if amx_bf16_native()
            else "avx512 BF16 (vdpbf16ps, 6x64 register tiles), OpenMP over rows"
            if bf16_native()
            else "generic scalar bf16 loop (no AVX-512 BF16 at this level), OpenMP over rows"
        ),
        "topk_similarity": f"{blas} + {vector} selection",
        "gather_rows": "memcpy rows (OpenMP)",
        "scatter_rows": "memcpy rows",
        "add": "numpy ufunc",
        "mul": "numpy ufunc",
        **{
            f"packed.matmul[{p}]": f"{packed.path(p)}; else {packed.path(p, 1 << 30)}"
            for p in packed.PRECISIONS
        },
        "threads": str(_NUM_THREADS),
    }
