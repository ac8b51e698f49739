"""Linear weights resident in fp32, bf16 or int8, and the matmul that reads them (LLM decode and
prefill; docs/architecture.md, "LLM decoding (Qwen3)").

Contract (shared with vtpu.models.qwen3 and the serving engine; keep it stable):

- `pack(w, precision)` turns a Linear weight W (N, K) -- float32, or raw bf16 bits as uint16 (how
  safetensors stores bf16 checkpoints) -- into a `PackedWeight`. "fp32" keeps float32; "bf16"
  rounds to nearest even and stores the 16 high bits as uint16; "int8" is weight-only,
  symmetric per output channel: scale[n] = max|W[n, :]| / 127 (1 for an all-zero row),
  q = rint(W / scale) in [-127, 127]. NaN or inf in W, or a value that bf16 cannot hold, is
  refused with KernelInputError.
- `matmul(x, w)` is y = x @ W.T for float32 x (M, K), any M >= 1, with W as stored (dequantised
  exactly: bf16 widened, int8 times its scale); accumulation is float32. 2MNK ops are counted
  through vtpu.counters.kernel_scope, like vtpu.kernels.linear.
- `rows(w, ids)` is the dequantised W[ids] (an embedding lookup from the table that also serves
  as a tied lm_head).

This module validates; the arithmetic lives in `_packed` (Cython + _packed.h), dispatched on the
CPU's features at run time. The layout is the plain row-major (N, K) of the checkpoint for every
precision, so a row is contiguous both for a GEMV's dot products and for `rows()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vtpu import ops as _ops
from vtpu.counters import kernel_scope
from vtpu.kernels import KernelInputError, _array, _check_dims, _out, _packed, isa, num_threads

__all__ = ["PRECISIONS", "PackedWeight", "matmul", "pack", "path", "rows"]

PRECISIONS = ("fp32", "bf16", "int8")
_PREC_CODE = {"fp32": _packed.PREC_F32, "bf16": _packed.PREC_BF16, "int8": _packed.PREC_I8}

# Activation rows up to which matmul reads W with its own widening kernel; above, W is widened
# block by block for BLAS sgemm. The own kernel's 4-row tiles ran at ~100 GFLOP/s on one Zen 4
# core (int8 and bf16, M = 512), about what OpenBLAS sgemm does per core, without a widening
# pass, and without handing the cores to BLAS's thread pool between our OpenMP kernels (each
# pool spin-waits after a call, taxing the other); on a busy machine BLAS fell far behind.
# fp32 too: with BLAS from M = 17 up, a 32-token fp32 prefill of Qwen3-0.6B alternated
# OpenBLAS's pool with our OpenMP kernels and took 1.2-1.6 s (0.4-3.4 s in bench-llm); with
# the own kernel 0.38-0.46 s. One layer's fp32 weights, own vs BLAS, interleaved: 7.7x as fast
# at M = 32, 2.7x at 128, 1.4x at 512. Measured on AMD EPYC Zen 4, 2 vCPUs, shared with other
# work.
_OWN_MAX_M = {"fp32": 1024, "bf16": 1024, "int8": 1024}
# Bytes of W a thread's slice holds while blocks of 4 activation rows pass over it (fits L2).
_SLICE_BYTES = 256 << 10
# fp32 elements of the scratch block widened per BLAS call in the prefill path.
_BLAS_BLOCK_ELEMENTS = 1 << 21
# Below this many multiply-adds a call runs on the calling thread (waking a team costs more).
_PARALLEL_MIN_MACS = 1 << 16

# Rows converted per step while packing, so packing a 151936 x 1024 table does not hold a second
# full-size float32 temporary.
_PACK_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A Linear weight W (N, K) resident in one precision; read it through matmul() and rows().

    data is float32, uint16 (bf16 bits) or int8, C-contiguous (N, K); scale is float32 (N,) for
    int8 and None otherwise.
    """

    shape: tuple[int, int]
    precision: str
    data: np.ndarray
    scale: np.ndarray | None = None
    # data's bytes as (N, K * element size) uint8, the form _packed takes; made once here since
    # a decode step calls matmul a few hundred times
    raw: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", self.data.view(np.uint8))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)

    def __repr__(self) -> str:
        n, k = self.shape
        return f"PackedWeight({n}x{k}, {self.precision}, {self.nbytes} bytes)"


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(w: np.ndarray) -> np.ndarray:
    """Round float32 to bf16, to nearest with ties to even (finite inputs)."""
    u = w.view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def _finite_bf16(bits: np.ndarray) -> bool:
    return not ((bits & np.uint16(0x7F80)) == np.uint16(0x7F80)).any()


def _weight(w: object) -> np.ndarray:
    if not isinstance(w, np.ndarray) or w.dtype not in (np.float32, np.uint16):
        got = w.dtype if isinstance(w, np.ndarray) else type(w).__name__
        raise KernelInputError(
            f"pack: w must be a float32 array, or uint16 holding raw bf16 bits, got {got}"
        )
    if w.ndim != 2:
        raise KernelInputError(f"pack: w must be 2-D (N, K) like a Linear weight, got {w.shape}")
    return np.ascontiguousarray(w)


def _chunks(n: int, k: int):
    step = max(1, _PACK_CHUNK_ELEMENTS // max(k, 1))
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


def pack(w: np.ndarray, precision: str) -> PackedWeight:
    """W (N, K) float32 or raw bf16 (uint16) -> a PackedWeight in `precision` ("fp32", "bf16",
    "int8"); see the module docstring for the rounding rules."""
    if precision not in PRECISIONS:
        raise KernelInputError(f"pack: precision must be one of {PRECISIONS}, got {precision!r}")
    w = _weight(w)
    n, k = w.shape
    raw_bf16 = w.dtype == np.uint16
    if precision == "bf16":
        data = np.empty((n, k), np.uint16)
    elif precision == "fp32":
        data = np.empty((n, k), np.float32)
    else:
        data = np.empty((n, k), np.int8)
    scale = np.empty(n, np.float32) if precision == "int8" else None
    for n0, n1 in _chunks(n, k):
        block = w[n0:n1]
        if raw_bf16:
            if not _finite_bf16(block):
                raise KernelInputError("pack: w must be finite (its bf16 bits hold NaN or inf)")
            wf = _bf16_bits_to_f32(block)
        else:
            if not np.isfinite(block).all():
                raise KernelInputError("pack: w must be finite (no NaN or inf)")
            wf = block
        if precision == "fp32":
            data[n0:n1] = wf
        elif precision == "bf16":
            bits = block if raw_bf16 else _f32_to_bf16_bits(wf)
            if not raw_bf16 and not _finite_bf16(bits):
                raise KernelInputError(
                    "pack: w holds a value beyond bf16's range (|w| > 3.39e38) that would "
                    "round to inf; pack it as fp32"
                )
            data[n0:n1] = bits
        else:
            amax = np.abs(wf).max(axis=1) if k else np.zeros(n1 - n0, np.float32)
            s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
            scale[n0:n1] = s
            data[n0:n1] = np.clip(np.rint(wf / s[:, None]), -127, 127).astype(np.int8)
    return PackedWeight((n, k), precision, data, scale)


def _packed_arg(name: str, w: object) -> PackedWeight:
    if not isinstance(w, PackedWeight):
        raise KernelInputError(f"{name}: w must be a PackedWeight from pack(), got {type(w)}")
    return w


def _threads(nthreads: int | None) -> int:
    if nthreads is None:
        return num_threads()
    if isinstance(nthreads, bool) or not isinstance(nthreads, int | np.integer) or nthreads < 1:
        raise KernelInputError(f"nthreads must be a positive integer or None, got {nthreads!r}")
    return int(nthreads)


def path(precision: str, m: int = 1) -> str:
    """Which implementation matmul() uses now for `precision` at M = m activation rows."""
    if precision not in PRECISIONS:
        raise KernelInputError(f"path: precision must be one of {PRECISIONS}, got {precision!r}")
    level = isa()
    widen = {"fp32": "", "bf16": " (bf16 << 16)", "int8": " (int8 -> fp32, x scale)"}[precision]
    own = f"{level} GEMV{widen}, W read once, OpenMP over output rows"
    if m <= _OWN_MAX_M[precision]:
        return own + f" (M <= {_OWN_MAX_M[precision]})"
    if precision == "fp32":
        return f"BLAS sgemm (M > {_OWN_MAX_M[precision]})"
    return f"{level} widening to fp32 blocks + BLAS sgemm (M > {_OWN_MAX_M[precision]})"


def matmul(
    x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None, nthreads: int | None = None
) -> np.ndarray:
    """y = x @ W.T: x float32 (M, K), y float32 (M, N).

    nthreads (default: vtpu.kernels.num_threads()) sizes the own kernels' OpenMP team; the
    prefill path's BLAS calls use BLAS's own threads. path(precision, M) names the route.
    """
    w = _packed_arg("matmul", w)
    x = _array("x", x, np.float32, 2)
    n, k = w.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise KernelInputError(
            f"matmul: x has {x.shape[1]} features but the weight is (N={n}, K={k})"
        )
    _check_dims(m=m, n=n, k=k)
    threads = _threads(nthreads)
    y = _out("matmul", out, (m, n), np.float32, x)
    if y.size == 0:
        return y
    if k == 0:
        y.fill(0.0)
        return y
    raw = w.raw
    code = _PREC_CODE[w.precision]
    with kernel_scope(_ops.gemm(m, n, k)):
        if m <= _OWN_MAX_M[w.precision]:
            if m * n * k < _PARALLEL_MIN_MACS:
                threads = 1
            per_thread = -(-n // threads)
            if m > _packed.GEMV_MAX_M:  # blocks of rows re-read a slice: keep it in L2
                parts = -(-per_thread * raw.shape[1] // _SLICE_BYTES)
                per_thread = -(-per_thread // parts)
            slice_rows = -(-per_thread // 4) * 4  # whole 4-row register tiles
            _packed.gemv(code, raw, w.scale, x, y, slice_rows, threads)
        elif w.precision == "fp32":
            _packed.blas_nt(x, w.data, y)
        else:
            block = max(16, min(n, _BLAS_BLOCK_ELEMENTS // k))
            _packed.dequant_blas(code, raw, w.scale, x, y, block)
    return y


def rows(w: PackedWeight, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The dequantised rows W[ids], float32 (len(ids), K)."""
    w = _packed_arg("rows", w)
    n, k = w.shape
    idx = np.asarray(ids)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise KernelInputError(f"rows: ids must be a 1-D array of integers, got {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise KernelInputError(f"rows: id {bad} is outside the table's {n} rows")
    y = _out("rows", out, (idx.size, k), np.float32, w.data)
    if y.size == 0:
        return y
    with kernel_scope(0):
        if w.precision == "fp32":
            np.take(w.data, idx, axis=0, out=y)
        elif w.precision == "bf16":
            y.view(np.uint32)[:] = w.data[idx].astype(np.uint32) << 16
        else:
            np.multiply(w.data[idx], w.scale[idx, None], out=y)
    return y
