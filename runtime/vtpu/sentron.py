"""The sentron: the executor that issues SIW programs, one word at a time, in order.

Within a word the S slot runs on the sentron's own S-pipe worker thread while the D slot runs on
the sentron's thread; the kernels and numpy copies release the GIL, so the two really overlap,
which is double buffering: S loads tile i+1 while D computes on tile i. The C slot runs after
both (loop, halt). The order within a word comes from siw.issue_order (dependency
bits, else the tensors the slots touch).

A program is validated (siw.validate) and its tensors fit into the arena before anything is
allocated; each word is then turned into a ready-to-call closure once, so issuing a word is a
tuple unpack and a call. Busy time is taken per slot with perf_counter_ns.
"""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

import vtpu.kernels as K
from vtpu import ops, siw
from vtpu.arena import Arena, ArenaFull, bytes_needed
from vtpu.counters import COUNTERS, PIPES, kernel_scope
from vtpu.kernels import decoder, packed
from vtpu.siw import COp, DOp, Limits, Program, ProgramError, SOp

__all__ = [
    "ArenaFull",
    "ProgramError",
    "RunError",
    "Prepared",
    "RunResult",
    "Sentron",
    "SentronCounters",
    "issue_overhead_ns",
    "measure_overlap",
    "run_parallel",
    "tiled_gemm_inputs",
    "tiled_gemm_program",
]


class RunError(ValueError):
    """A program could not run: bad inputs, a full arena, or a slot that failed at word `index`."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        super().__init__(message if index is None else f"word {index}: {message}")


class RunCancelled(RunError):
    """The run was stopped by Sentron.cancel() (a deadline, a shutdown) between two words."""


@dataclass
class RunResult:
    outputs: dict[str, np.ndarray]
    words_issued: int
    loops_taken: int  # back-jumps taken by C.loop
    busy_ns: dict[str, int]  # per pipe
    wall_ns: int  # issuing, from the first word to halt
    setup_ns: int  # validation, allocation, initialisation
    ops: int  # counted from shapes by the kernels' rules
    sentron_id: int = 0
    intervals: list[tuple[str, int, int, int]] | None = None  # (pipe, word, start_ns, end_ns)


@dataclass
class SentronCounters:
    """One sentron's own record (the node-wide one is vtpu.counters.COUNTERS)."""

    siw_issued: int = 0
    programs_run: int = 0
    errors: int = 0
    ops: int = 0
    pipe_busy_ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PIPES, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_run(self, result: RunResult) -> None:
        with self._lock:
            self.siw_issued += result.words_issued
            self.programs_run += 1
            self.ops += result.ops
            for pipe, ns in result.busy_ns.items():
                self.pipe_busy_ns[pipe] += ns

    def add_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "siw_issued": self.siw_issued,
                "programs_run": self.programs_run,
                "errors": self.errors,
                "ops": self.ops,
                "pipe_busy_ns": dict(self.pipe_busy_ns),
            }


class _PipeWorker:
    """A thread that runs one slot at a time and reports (start_ns, end_ns, error)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        perf = time.perf_counter_ns
        while True:
            fn = self._jobs.get()
            if fn is None:
                return
            start = perf()
            try:
                fn()
                error = None
            except BaseException as exc:  # handed to the issuing thread, which re-raises
                error = exc
            self._done.put((start, perf(), error))

    def submit(self, fn: Callable[[], object]) -> None:
        self._jobs.put(fn)

    def result(self) -> tuple[int, int, BaseException | None]:
        return self._done.get()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


# ---------------------------------------------------------------------------------- kernels


_ACT_NAMES = ("none", "relu", "gelu", "silu")

# The encoder's packed Linear weights (siw: "Packed Linear weights") by SIW dtype: the weight
# class a resident of that dtype is bound to and the kernel D.linear calls with it, the one a
# loaded encoder's hand-written forward calls (vtpu.models.bert).
LINEAR_WEIGHTS: dict[str, tuple[type, Callable[..., np.ndarray]]] = {
    "bf16lin": (K.Bf16Weight, K.linear_bf16),
    "int8lin": (K.Int8GroupWeight, K.linear_weight_int8),
    "int8dyn": (K.Int8Weight, K.linear_dynamic_int8),
}
_LINEAR_KERNELS = {"f32": K.linear, **{d: fn for d, (_, fn) in LINEAR_WEIGHTS.items()}}


def packed_linear_dtype(weight: object) -> str | None:
    """The SIW dtype of a packed Linear weight (K.Bf16Weight, ...), None for anything else."""
    return next((d for d, (kind, _) in LINEAR_WEIGHTS.items() if type(weight) is kind), None)


def linear_weight_shape(weight: object) -> tuple[int, int]:
    """A packed Linear weight's (K, N): the x (m, K) -> (m, N) its D.linear reads."""
    if isinstance(weight, K.Int8GroupWeight):
        return tuple(weight.q.shape)  # type: ignore[return-value]
    return (weight.k, weight.n)  # type: ignore[attr-defined]


def binding_nbytes(value: object) -> int:
    """Bytes of a resident binding: an array, a packed weight, or a layer stack of those."""
    if isinstance(value, tuple | list):
        return sum(binding_nbytes(v) for v in value)
    return int(value.nbytes)  # type: ignore[attr-defined]


def _packed_parts(weight: object) -> str | None:
    """What is wrong with a packed Linear weight's parts (what its kernel would read beyond or
    misread), or None. The packing functions make them right; a binding is checked anyway."""

    def dense(a: object, dtype: type, shape: tuple[int, ...]) -> bool:
        return (
            isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape
            and a.flags.c_contiguous
        )  # fmt: skip

    k, n = linear_weight_shape(weight)
    if isinstance(weight, K.Bf16Weight):
        want = (-(-n // 16) * 16 * -(-k // 2) * 2,)
        return None if dense(weight.packed, np.uint16, want) else f"packed must be uint16 {want}"
    if isinstance(weight, K.Int8GroupWeight):
        group = weight.group
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            return f"group {group!r} must be a positive integer"
        if not dense(weight.scale, np.float32, (-(-k // group), n)):
            return f"scale must be float32 ({-(-k // group)}, {n}): one row per group of {group}"
        return None if dense(weight.q, np.int8, (k, n)) else f"q must be int8 ({k}, {n})"
    group, kq, np8 = weight.group, -(-k // 4), -(-n // 8) * 8  # type: ignore[attr-defined]
    if isinstance(group, bool) or not isinstance(group, int) or group < 4 or group % 4:
        return f"group {group!r} must be a positive multiple of 4"
    if group > siw.INT8_MAX_K:
        return f"group {group} could overflow the int32 sums (at most {siw.INT8_MAX_K})"
    groups = -(-kq // (group // 4))
    outliers = weight.outliers  # type: ignore[attr-defined]
    parts = (
        ("packed", weight.packed, np.int8, (np8 * kq * 4,)),  # type: ignore[attr-defined]
        ("scale", weight.scale, np.float32, (groups, np8)),  # type: ignore[attr-defined]
        ("gsum", weight.gsum, np.int32, (groups, np8)),  # type: ignore[attr-defined]
        ("wsum", weight.wsum, np.float32, (n,)),  # type: ignore[attr-defined]
        ("keep", weight.keep, np.uint8, (k,)),  # type: ignore[attr-defined]
        ("outliers", outliers, np.int64, (getattr(outliers, "size", -1),)),
        ("outlier_w", weight.outlier_w, np.float32,  # type: ignore[attr-defined]
         (getattr(outliers, "size", -1), n)),
    )  # fmt: skip
    for name, array, dtype, shape in parts:
        if not dense(array, dtype, shape):
            return f"{name} must be {np.dtype(dtype).name} {shape}, dense"
    if outliers.size and (outliers.min() < 0 or outliers.max() >= k):
        return f"outliers must be input channels in [0, {k})"
    return None


def _prefetch(tile: np.ndarray) -> None:
    # One byte per 64-byte line brings the tile into cache; numpy reduces without the GIL.
    np.bitwise_or.reduce(tile.reshape(-1).view(np.uint8)[::64])


def _word_ops(program: Program, w: dict) -> int:
    """Ops of a D slot, from the one op-count table (vtpu.ops) the kernels count with."""
    t = program.tensors
    op = w["d_op"]
    if op in (DOp.GEMM, DOp.GEMM_I8):
        (m, k), n = t[w["d_a"]].shape, t[w["d_b"]].shape[1]
        return ops.gemm(m, n, k)
    if op == DOp.LINEAR:
        (m, k), n = t[w["d_a"]].shape, t[w["d_b"]].shape[1]
        return ops.linear(m, n, k, bias=w["d_c"] != siw.NONE, activation=bool(w["d_flags"] & 3))
    size = t[w["d_dst"]].size if op else 0
    per_element = {
        DOp.ADD: "add",
        DOp.MUL: "mul",
        DOp.LAYERNORM: "layer_norm",
        DOp.RMSNORM: "rms_norm",
        DOp.SOFTMAX: "softmax",
    }
    if op in per_element:
        return ops.PER_ELEMENT[per_element[op]] * size
    if op == DOp.ATTENTION:
        h, sq, d = t[w["d_a"]].shape
        sk = t[w["d_b"]].shape[1]
        causal = bool(w["d_flags"] & siw.FLAG_CAUSAL)
        scores = ops.attention_scores(sq, sk, heads=h, causal=causal)
        return ops.attention(scores, h * sq, d)
    if op == DOp.ADD_LAYERNORM:
        return ops.PER_ELEMENT["add_layer_norm"] * size
    if op == DOp.L2NORM:
        return ops.PER_ELEMENT["l2_normalize"] * size
    if op == DOp.GELU:
        return size
    if op == DOp.MATMUL:
        (m, k), n = t[w["d_a"]].shape, t[w["d_b"]].shape[0]
        return ops.gemm(m, n, k)
    if op == DOp.ADD_RMSNORM:
        return (ops.PER_ELEMENT["add"] + ops.PER_ELEMENT["rms_norm"]) * size
    if op == DOp.KV_STORE_PAGED:  # the RMSNorm and rotation of every q and k head
        bsz, seq, width = t[w["d_a"]].shape
        d = t[w["d_b"]].shape[1]
        heads_and_kv = width // d - t[w["d_dst"]].shape[3]
        return (
            (ops.PER_ELEMENT["rms_norm"] + ops.PER_ELEMENT["rope"]) * bsz * seq * heads_and_kv * d
        )
    if op == DOp.ATTN_GQA:
        bsz, seq, width = t[w["d_dst"]].shape
        heads = w["d_flags"]
        scores = ops.attention_scores(seq, seq, heads=heads, causal=True) * bsz
        return ops.attention(scores, bsz * heads * seq, width // heads)
    return 0


def _data_ops(program: Program, w: dict, v: list) -> Callable[[], int] | None:
    """Ops of a D slot that depend on the lengths it reads at run time (masked attention and
    pooling count only the rows they see), as a function called when the word issues."""
    t, op, lengths = program.tensors, w["d_op"], w["d_b"]
    if op == DOp.ATTN_QKV:
        bsz, seq, width = t[w["d_a"]].shape
        heads = w["d_flags"]
        d = width // (3 * heads)
        # the lengths last counted and their ops: a layer loop issues this word once a layer,
        # over the same lengths (counting them costs a small batch's forward a few per cent)
        last: list = [None, 0]

        def attn_ops() -> int:
            key = v[lengths].tobytes()
            if key != last[0]:
                scores = ops.attention_scores(seq, seq, heads=heads, key_lengths=v[lengths])
                last[:] = [key, ops.attention(scores, bsz * heads * seq, d)]
            return last[1]

        return attn_ops
    if op == DOp.MEAN_POOL:
        bsz, _, d = t[w["d_a"]].shape
        return lambda: ops.masked_mean_pool(int(v[lengths].sum()), bsz, d)
    if op == DOp.PAGED_ATTN:  # the keys each query sees, from the page table's lengths
        bsz, seq, width = t[w["d_dst"]].shape
        table = w["d_c"]
        kv_heads = t[w["d_b"]].shape[3]
        d = (t[w["d_a"]].shape[2] - width) // (2 * kv_heads)
        heads = width // d

        def paged_ops() -> int:
            # causal: token j of sequence b (length L) sees L - seq + j + 1 keys
            keys = int(v[table][:, 0].sum()) * seq - bsz * (seq * (seq - 1) // 2)
            return ops.attention(keys * heads, bsz * heads * seq, d)

        return paged_ops
    if op == DOp.CACHED_ATTN:
        positions, heads = w["d_c"], w["d_flags"]
        bsz, _, width = t[w["d_dst"]].shape
        return lambda: ops.attention(
            heads * int(v[positions].sum() + bsz), bsz * heads, width // heads
        )
    return None


def _imm(w: dict) -> float | None:
    value = float(np.uint32(w["d_imm"]).view(np.float32))
    return value if w["d_imm"] else None


def _d_slot(
    program: Program, w: dict, v: list, shared: dict | None = None
) -> Callable[[], object] | None:
    """Word w's D slot as a closure over the tensor slots `v`; `shared` is per prepared program
    (what several words derive once per run, such as a step's page table)."""
    op, dst, a, b, c = w["d_op"], w["d_dst"], w["d_a"], w["d_b"], w["d_c"]
    if op == DOp.NOP:
        return None
    if op == DOp.GEMM:
        if w["d_flags"] & siw.FLAG_ACC:
            return lambda: K.gemm(v[a], v[b], beta=1.0, out=v[dst])
        return lambda: K.gemm(v[a], v[b], out=v[dst])
    if op == DOp.LINEAR:  # f32 (K, N), or packed for its reduced-precision kernel
        act = _ACT_NAMES[w["d_flags"] & 3]
        linear = _LINEAR_KERNELS[program.tensors[b].dtype]
        if c == siw.NONE:
            return lambda: linear(v[a], v[b], None, act, out=v[dst])
        return lambda: linear(v[a], v[b], v[c], act, out=v[dst])
    if op == DOp.ADD:
        return lambda: K.add(v[a], v[b], out=v[dst])
    if op == DOp.MUL:
        return lambda: K.mul(v[a], v[b], out=v[dst])
    if op == DOp.LAYERNORM:
        eps = _imm(w) or 1e-5
        return lambda: K.layer_norm(v[a], v[b], v[c], eps, out=v[dst])
    if op == DOp.RMSNORM:
        eps = _imm(w) or 1e-6
        return lambda: K.rms_norm(v[a], v[b], eps, out=v[dst])
    if op == DOp.SOFTMAX:
        return lambda: K.softmax(v[a], out=v[dst])
    if op == DOp.ATTENTION:
        causal, scale = bool(w["d_flags"] & siw.FLAG_CAUSAL), _imm(w)
        return lambda: K.attention(
            v[a][None], v[b][None], v[c][None], causal=causal, scale=scale, out=v[dst][None]
        )
    if op == DOp.GEMM_I8:
        return lambda: K.gemm_int8(v[a], v[b], out=v[dst])
    if op == DOp.ADD_LAYERNORM:
        eps = _imm(w) or 1e-5
        return lambda: K.add_layer_norm(v[a], v[b], v[c][0], v[c][1], eps, out=v[dst])
    if op == DOp.ATTN_QKV:
        heads, scale = w["d_flags"], _imm(w)
        return lambda: K.attention_packed(v[a], heads, key_lengths=v[b], scale=scale, out=v[dst])
    if op == DOp.MEAN_POOL:
        return lambda: K.masked_mean_pool(v[a], v[b], out=v[dst])
    if op == DOp.L2NORM:
        eps = _imm(w) or 1e-12
        return lambda: K.l2_normalize(v[a], eps, out=v[dst])
    if op == DOp.GELU:
        if dst == a:
            return lambda: K.bias_activation(v[dst], None, "gelu")
        return lambda: K.bias_activation(_copy_into(v[dst], v[a]), None, "gelu")
    slot = _decoder_slot(program, w, v, {} if shared is None else shared)
    if slot is not None:
        return slot
    raise AssertionError(f"validated program has D opcode {op}")


def _decoder_slot(program: Program, w: dict, v: list, shared: dict) -> Callable[[], object] | None:
    """The decoder's D ops. Each calls what phextcc.run calls for the graph op it lowers
    (packed.matmul / packed.rows, vtpu.kernels, vtpu.kernels.decoder), in the same order, so a
    lowered program's logits equal the interpreted graph's bit for bit; the paged ops call the
    kernels of vtpu.models.qwen3's hand-written forward, so they equal it bit for bit."""
    op, dst, a, b, c = w["d_op"], w["d_dst"], w["d_a"], w["d_b"], w["d_c"]
    t = program.tensors
    eps = _imm(w) or 1e-6
    heads = w["d_flags"]
    if op == DOp.ADD_RMSNORM:
        add_ops = ops.PER_ELEMENT["add"] * t[a].size

        def add_rmsnorm() -> None:
            # the residual stream, left in x: K.add's ufunc and count, its checks done by
            # siw.validate (they cost a decode step ~3 us a layer)
            with kernel_scope(add_ops):
                np.add(v[a], v[b], out=v[a])
            K.rms_norm(v[a], v[c], eps, out=v[dst])

        return add_rmsnorm
    if op == DOp.MATMUL:
        weight = _packed_weight(t, v, b, c)
        return lambda: packed.matmul(v[a], weight(), out=v[dst])
    if op == DOp.ROWS:
        table = _packed_weight(t, v, a, c)
        return lambda: packed.rows(table(), v[b], out=v[dst])
    if op == DOp.SWIGLU:
        n = t[dst].shape[-1]

        def swiglu() -> None:
            x = v[a]
            np.multiply(decoder.silu(x[..., :n], out=v[dst]), x[..., n:], out=v[dst])

        return swiglu
    if op == DOp.QK_NORM_ROPE:
        d = t[a].shape[1]
        kv = (t[dst].shape[2] // d - heads) // 2
        attrs = {"heads": heads, "kv_heads": kv, "head_dim": d, "eps": eps}

        def qk_norm_rope() -> None:
            gammas = v[a]
            decoder.qk_norm_rope([v[dst], gammas[0], gammas[1], v[c]], attrs, v[dst], v[b])

        return qk_norm_rope
    if op == DOp.ATTN_GQA:
        d = t[dst].shape[2] // heads
        kv = (t[a].shape[2] // d - heads) // 2
        attrs = {"heads": heads, "kv_heads": kv, "head_dim": d, "causal": True, "packed": True}
        return lambda: np.copyto(v[dst], decoder.gqa_attention([v[a]], attrs, None))
    if op in (DOp.KV_APPEND, DOp.CACHED_ATTN):
        cache = t[dst if op == DOp.KV_APPEND else b].shape
        attrs = {"heads": heads, "kv_heads": cache[2], "head_dim": cache[4], "packed": True}
        if op == DOp.KV_APPEND:
            return lambda: decoder.kv_append([v[dst], v[a], v[b]], attrs)
        return lambda: np.copyto(v[dst], decoder.cached_attention([v[a], v[b], v[c]], attrs))
    if op in (DOp.KV_STORE_PAGED, DOp.PAGED_ATTN):
        return _paged_slot(program, w, v, shared)
    return None


class _StepPages:
    """The page table of the run in progress, validated and derived once per run and shared by
    every paged word of a prepared program (the table tensor is a new array each run), and the
    views the words read (every layer's words read the same buffers: derived once a run)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self.table: decoder.PageTable | None = None
        self._scratch = np.empty(0, np.float32)
        self._views: dict[tuple, tuple[np.ndarray, tuple]] = {}

    def views(self, key: tuple, array: np.ndarray, make: Callable[[np.ndarray], tuple]) -> tuple:
        """make(array), reused while `array` is the same object (this run's binding)."""
        hit = self._views.get(key)
        if hit is None or hit[0] is not array:
            hit = self._views[key] = (array, make(array))
        return hit[1]

    def get(self, array: np.ndarray, seq: int, page_tokens: int, frames: int) -> decoder.PageTable:
        if array is not self.array or self.table is None or self.table.seq != seq:
            self.table = decoder.PageTable(array, seq, page_tokens, frames)
            self.array = array
        return self.table

    def scratch(self, rows: int, width: int) -> np.ndarray:
        """Decode attention's score rows, dense (rows, width), reused from run to run."""
        if self._scratch.size < rows * width:
            self._scratch = np.empty(rows * width, np.float32)
        return self._scratch[: rows * width].reshape(rows, width)


def _paged_slot(program: Program, w: dict, v: list, shared: dict) -> Callable[[], object]:
    """KV_STORE_PAGED and PAGED_ATTN over the node's KV arena (siw's docstring)."""
    op, dst, a, b, c, e = w["d_op"], w["d_dst"], w["d_a"], w["d_b"], w["d_c"], w["d_e"]
    t = program.tensors
    layer = w["d_flags"]
    arena_id = dst if op == DOp.KV_STORE_PAGED else b
    frames, _, _, kv_heads, page_width = t[arena_id].shape
    bsz, seq, width = t[a].shape
    if op == DOp.KV_STORE_PAGED:
        d = t[b].shape[1]
    else:
        d = (width - t[dst].shape[2]) // (2 * kv_heads)
    P, heads = page_width // d, width // d - 2 * kv_heads
    steps = shared.setdefault("pages", _StepPages())
    rows = bsz * seq

    def split_queries(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qkv = array.reshape(rows, width)
        q = qkv[:, : heads * d]
        q.shape = (rows, heads, d)  # a view of qkv's q columns (setting shape never copies)
        return qkv, q

    def queries() -> tuple[np.ndarray, np.ndarray]:
        return steps.views(("q", a, rows, width, heads), v[a], split_queries)

    if op == DOp.KV_STORE_PAGED:
        eps = _imm(w) or 1e-6
        # resident gammas are bound by now (prepare binds them first): split once
        fixed = (v[b][0], v[b][1]) if t[b].init == "resident" else None

        def kv_store_paged() -> None:
            table = steps.get(v[e], seq, P, frames)
            qkv, q = queries()
            q_gamma, k_gamma = fixed or (v[b][0], v[b][1])
            cos, sin = steps.views(("rope", c), v[c], lambda r: (r[0], r[1]))
            decoder.store(qkv, q_gamma, k_gamma, eps, cos, sin, v[dst], layer,
                          table.row_frames, table.slots, q)  # fmt: skip

        return kv_store_paged

    def paged_attn() -> None:
        table = steps.get(v[c], seq, P, frames)
        _, q = queries()
        if seq == 1:
            out = v[dst].reshape(bsz, heads, d)
            scratch = steps.scratch(bsz * heads, table.longest)
            decoder.decode_attention(q, v[b], layer, table.frames, table.page_start,
                                     table.lengths, out, scratch)  # fmt: skip
            return
        out = v[dst].reshape(rows, heads * d)
        starts = table.page_start
        for i in range(bsz):
            pages = table.frames[starts[i] : starts[i + 1]]
            out[i * seq : (i + 1) * seq] = decoder.prefill_attention(
                q[i * seq : (i + 1) * seq], v[b], layer, pages, int(table.lengths[i])
            )

    return paged_attn


def _packed_weight(
    t: list[siw.TensorSpec], v: list, data: int, scale: int
) -> Callable[[], packed.PackedWeight]:
    """The PackedWeight a MATMUL or ROWS word reads: made once for resident tensors (bound at
    prepare), per call for tensors bound per run."""
    precision = {"f32": "fp32", "bf16": "bf16", "i8": "int8"}[t[data].dtype]
    shape = t[data].shape

    def make() -> packed.PackedWeight:
        return packed.PackedWeight(
            shape, precision, v[data], None if scale == siw.NONE else v[scale]
        )

    resident = t[data].init == "resident" and (scale == siw.NONE or t[scale].init == "resident")
    if resident and v[data] is not None:
        weight = make()
        return lambda: weight
    return make


def _copy_into(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    np.copyto(dst, src)
    return dst


def make_view(base: np.ndarray, spec: siw.TensorSpec, value: int = 0) -> np.ndarray:
    """A view tensor over its base's memory (the base is a dense array: arena, resident);
    a register-relative one where its register holds `value` (validated in range). A view of
    a packed Linear weight is one whole weight: the stack's layer it selects."""
    offset = spec.offset_at(value) if spec.reg is not None else spec.offset
    if spec.dtype in siw.PACKED_WEIGHTS:
        return base[offset // spec.size] if isinstance(base, tuple | list) else base
    flat = base.reshape(-1)
    if spec.contiguous:
        return flat[offset : offset + spec.size].reshape(spec.shape)
    item = flat.itemsize
    return np.lib.stride_tricks.as_strided(
        flat[offset:],
        spec.shape,
        tuple(s * item for s in spec.strides),
        writeable=base.flags.writeable,
    )


class _RegisterView:
    """A register-relative view's arrays, one per register value, made when first needed and
    kept (up to CACHED values): a C.loop rebinds the view's slot by indexing this, so the D and
    S closures read v[id] as for any tensor. Per run for views of run memory."""

    CACHED = 4096

    def __init__(self, tid: int, base: int, spec: siw.TensorSpec, resident: bool) -> None:
        self.tid, self.base, self.spec, self.resident = tid, base, spec, resident
        self.arrays: list[np.ndarray | None] = []

    def reset(self, v: list) -> None:
        """Bind the value-0 view at a run's start (registers start at 0); views of run memory
        forget the previous run's arrays."""
        if not self.resident:
            self.arrays = []
        v[self.tid] = self.at(0, v)

    def at(self, value: int, v: list) -> np.ndarray:
        arrays = self.arrays
        if value < len(arrays):
            view = arrays[value]
            if view is not None:
                return view
        view = make_view(v[self.base], self.spec, value)
        if value < self.CACHED:
            arrays.extend([None] * (value + 1 - len(arrays)))
            arrays[value] = view
        return view


def _rebinder(views: list[_RegisterView], v: list, values: int) -> Callable[[int], None]:
    """What a C.loop with a register does when the register changes (to 0..values - 1):
    rebind each view on it that its body uses. Views of resident tensors are tabled per value
    here, once, so a back-jump only stores them (a few hundred ns for a layer's ten)."""
    if values > _RegisterView.CACHED:
        fixed, lazy = [], views
    else:
        fixed = [view for view in views if view.resident]
        lazy = [view for view in views if not view.resident]
    table = [[(view.tid, view.at(k, v)) for view in fixed] for k in range(values)] if fixed else []

    def rebind(value: int) -> None:
        if table:
            for tid, array in table[value]:
                v[tid] = array
        for view in lazy:
            v[view.tid] = view.at(value, v)

    return rebind


def _s_slot(
    program: Program, w: dict, v: list, arena: Arena, index: int, children: dict
) -> Callable[[], object] | None:
    op, dst, src, idx = w["s_op"], w["s_dst"], w["s_src"], w["s_idx"]
    lo, hi = w["s_tile"] * w["s_rows"], (w["s_tile"] + 1) * w["s_rows"]
    rows = w["s_rows"]
    if op == SOp.NOP:
        return None
    if op == SOp.LOAD:
        return lambda: np.copyto(v[dst][:rows], v[src][lo:hi])
    if op == SOp.STORE:
        return lambda: np.copyto(v[dst][lo:hi], v[src][:rows])
    if op == SOp.GATHER:
        return lambda: K.gather_rows(v[src], v[idx], out=v[dst])
    if op == SOp.SCATTER:
        return lambda: K.scatter_rows(v[dst], v[idx], v[src])
    if op == SOp.PREFETCH:
        return lambda: _prefetch(v[src][lo:hi])
    spec = program.tensors[dst]
    if op == SOp.ALLOC:

        def alloc() -> None:
            if v[dst] is not None:
                raise RunError(f"S.alloc {spec.name!r}: already allocated; S.free it first", index)
            v[dst] = arena.tensor(spec.shape, siw.NUMPY_DTYPES[spec.dtype])
            v[dst].fill(0)
            for child in children.get(dst, ()):
                v[child] = make_view(v[dst], program.tensors[child])

        return alloc
    if op == SOp.FREE:

        def free() -> None:
            if v[dst] is None:
                raise RunError(f"S.free {spec.name!r}: it is not allocated", index)
            arena.release(v[dst])
            v[dst] = None
            for child in children.get(dst, ()):
                v[child] = None

        return free
    raise AssertionError(f"validated program has S opcode {op}")


def _guard_scratch(
    fn, ids: set[int], program: Program, v: list, index: int, pipe: str, owners: list[int]
):
    """Wrap a slot that uses scratch tensors (or views of one) so an unallocated one is a clear
    error."""
    scratch = [t for t in ids if program.tensors[owners[t]].init == "scratch"]
    if fn is None or not scratch:
        return fn

    def guarded():
        for t in scratch:
            if v[t] is None:
                raise RunError(
                    f"{pipe} slot uses scratch tensor {program.tensors[t].name!r}, which is not"
                    " allocated here: S.alloc it in an earlier word",
                    index,
                )
        return fn()

    return guarded


# ---------------------------------------------------------------------------------- sentron


def _as_program(program: Program | bytes | str, limits: Limits, check: bool) -> Program:
    if isinstance(program, bytes | bytearray | memoryview):
        return siw.decode(bytes(program), limits, check=check)
    if isinstance(program, str):
        return siw.assemble(program, limits, check=check)
    if check:
        siw.validate(program, limits)
    return program


def arena_bytes_for(program: Program) -> int:
    """Arena bytes a program needs with every tensor, scratch included, live at once."""
    return bytes_needed(
        [(t.shape, siw.NUMPY_DTYPES[t.dtype]) for t in program.tensors
         if t.init not in ("resident", "view", "inout")]
    )  # fmt: skip


class Sentron:
    """Issues SIW programs over tensors in its arena; D on this thread, S on its own worker."""

    def __init__(
        self, arena: Arena, *, sentron_id: int = 0, overlap: bool = True, keep: bool = False
    ) -> None:
        self.arena = arena
        self.sentron_id = sentron_id
        self.overlap = overlap
        # keep: a run leaves its program's tensors (and their views) allocated for the next run
        # of the same Prepared, which then only initialises them; another program's run gives
        # them back first. For a sentron that serves one model's programs to one caller at a
        # time (phextcc's modules): allocating and viewing a dozen tensors per run was ~70 us,
        # 2 % of a one-sentence int8 forward. Its arena then stays in use between runs.
        self.keep = keep
        self._kept: tuple[Prepared, dict[int, np.ndarray]] | None = None
        self.counters = SentronCounters()
        self._s_pipe: _PipeWorker | None = None
        # Each run has its own cancel event, so a cancel meant for one run (a deadline that
        # fired just as it ended) can never stop the next run on this sentron.
        self._run_lock = threading.Lock()
        self._current: threading.Event | None = None

    def cancel(self) -> None:
        """Stop the run in progress before its next word (a kernel already running finishes);
        a no-op when idle. Safe from any thread; the run raises RunCancelled and the sentron
        stays usable. To cancel one particular run, pass `cancel=` to run() and set that."""
        with self._run_lock:
            if self._current is not None:
                self._current.set()

    def _kept_for(self, prepared: Prepared) -> dict[int, np.ndarray]:
        """The tensors and views the last run of `prepared` left allocated (keep), else none:
        another program's are given back to the arena first."""
        if self._kept is not None and self._kept[0] is prepared:
            arrays = self._kept[1]
            self._kept = None
            return arrays
        self._give_back()
        return {}

    def _give_back(self) -> None:
        if self._kept is not None:
            owner, arrays = self._kept
            self._kept = None
            for i in owner.arena_owned:  # the kept views are not arena blocks
                if i in arrays:
                    self.arena.release(arrays[i])

    def close(self) -> None:
        self._give_back()
        if self._s_pipe is not None:
            self._s_pipe.close()
            self._s_pipe = None

    def __enter__(self) -> Sentron:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the daemon thread dies with it
            pass

    def prepare(
        self,
        program: Program | bytes | str,
        resident: Mapping[str, np.ndarray] | None = None,
        *,
        limits: Limits = siw.DEFAULT_LIMITS,
        validate: bool = True,
    ) -> Prepared:
        """Validate a program, bind its resident tensors (no copy) and turn its words into
        closures once; run(prepared, inputs) then only allocates, binds inputs and issues.
        A model's compiled program is prepared once per shape and run for every batch."""
        program = _as_program(program, limits, validate)
        owners = siw.roots(program)
        views: list[np.ndarray | None] = [None] * len(program.tensors)
        _bind_resident(program, resident or {}, views)
        children: dict[int, list[int]] = {}
        for i, spec in enumerate(program.tensors):
            if spec.init == "view":
                children.setdefault(owners[i], []).append(i)
        plan = []
        shared: dict = {}
        for i, row in enumerate(program.words.tolist()):
            w = dict(zip(siw.SIW_DTYPE.names, row, strict=True))
            d_reads, d_writes, s_reads, s_writes = siw._rw_sets(w)
            d = _guard_scratch(
                _d_slot(program, w, views, shared), d_reads | d_writes, program, views, i, "D",
                owners,
            )  # fmt: skip
            s = _s_slot(program, w, views, self.arena, i, children)
            if w["s_op"] not in (SOp.ALLOC, SOp.FREE):
                s = _guard_scratch(s, s_reads | s_writes, program, views, i, "S", owners)
            order = siw.issue_order(program, i, w, owners) if d and s else siw.ORDER_PARALLEL
            word_ops = _data_ops(program, w, views) or _word_ops(program, w)
            plan.append((d, s, w["c_op"], w["c_target"], w["c_count"], order, word_ops))
        register_views, rebinds = _register_plan(program, owners, views)
        allocated = [
            i
            for i, t in enumerate(program.tensors)
            if t.init not in ("scratch", "resident", "view", "inout")
        ]
        inout = [i for i, t in enumerate(program.tensors) if t.init == "inout"]
        bound_views = [
            i
            for i, t in enumerate(program.tensors)
            if t.init == "view" and program.tensors[owners[i]].init not in ("scratch", "resident")
        ]
        for i, t in enumerate(program.tensors):  # views of resident tensors: bound once
            if t.init == "view" and program.tensors[owners[i]].init == "resident":
                views[i] = make_view(views[owners[i]], t)
        need = bytes_needed(
            [(program.tensors[i].shape, siw.NUMPY_DTYPES[program.tensors[i].dtype])
             for i in allocated]
        )  # fmt: skip
        tensors = program.tensors
        return Prepared(
            program, views, plan, allocated, bound_views, owners, need, inout,
            declared=[t for t in tensors if t.init in ("input", "inout")],
            outputs=[i for i, t in enumerate(tensors) if t.output],
            arena_owned=[i for i, t in enumerate(tensors) if t.init not in ("resident", "view",
                                                                            "inout")],
            unbound=inout + [i for i, t in enumerate(tensors)
                             if t.init == "view" and tensors[owners[i]].init != "resident"],
            register_views=register_views,
            rebinds=rebinds,
            written_first={i for i in siw.written_first(program, owners)
                           if tensors[i].init in ("zeros", "ones", "random")},
        )  # fmt: skip

    def run(
        self,
        program: Program | bytes | str | Prepared,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        resident: Mapping[str, np.ndarray] | None = None,
        limits: Limits = siw.DEFAULT_LIMITS,
        validate: bool = True,
        trace: bool = False,
        cancel: threading.Event | None = None,
    ) -> RunResult:
        """Validate, bind `inputs` by name (copied into the arena) and `resident` tensors by
        name (used in place, read-only), run to C.halt, return copies of the outputs.

        validate=False skips siw.validate for a Program already validated (benchmarks); a
        Prepared program (prepare()) skips validation and planning altogether.
        `cancel`, when set (from any thread), stops this run, and only this one, between words."""
        event = cancel if cancel is not None else threading.Event()
        with self._run_lock:
            self._current = event
        try:
            t_setup = time.perf_counter_ns()
            if not isinstance(program, Prepared):
                program = self.prepare(program, resident, limits=limits, validate=validate)
            elif resident is not None:
                raise RunError("a prepared program has its resident tensors bound already")
            with program.lock:
                return self._run(program, inputs or {}, trace, event, t_setup)
        except Exception:
            self.counters.add_error()
            COUNTERS.add(errors=1)
            raise
        finally:
            with self._run_lock:
                if self._current is event:
                    self._current = None

    def _run(self, prepared: Prepared, inputs, trace, cancel, t_setup) -> RunResult:
        program, views = prepared.program, prepared.views
        _check_inputs(program, inputs, prepared.declared)
        kept = self._kept_for(prepared)
        if not kept and prepared.arena_bytes > self.arena.free_bytes:
            raise ArenaFull(
                f"the program's tensors need {prepared.arena_bytes} bytes; the arena has"
                f" {self.arena.free_bytes} of {self.arena.capacity} free. Give the sentron a"
                f" larger arena (at least {prepared.arena_bytes + self.arena.used} bytes)"
            )
        tensors = program.tensors
        owners = prepared.owners
        try:
            for i in prepared.inout:
                views[i] = inputs[tensors[i].name]
            for i in prepared.allocated:
                spec = tensors[i]
                view = kept.get(i)
                if view is None:
                    view = self.arena.tensor(spec.shape, siw.NUMPY_DTYPES[spec.dtype])
                elif spec.init == "input":
                    # a new array object over the kept memory: caches that key on an input's
                    # array object to mean "this run's values" (a paged decode's page table)
                    # must see every run's input as new
                    view = view.view()
                views[i] = view
                if i not in prepared.written_first:
                    _initialise(view, spec, inputs)
            for i in prepared.bound_views:
                view = kept.get(i)
                views[i] = make_view(views[owners[i]], tensors[i]) if view is None else view
            for view in prepared.register_views:
                view.reset(views)
            if self.overlap and self._s_pipe is None and any(p[1] for p in prepared.plan):
                self._s_pipe = _PipeWorker(f"sentron{self.sentron_id}-S")
            setup_ns = time.perf_counter_ns() - t_setup
            result = self._issue(program, prepared.plan, prepared.rebinds, trace, cancel)
            result.setup_ns = setup_ns
            result.outputs = {
                tensors[i].name: views[i].copy() for i in prepared.outputs if views[i] is not None
            }
        finally:
            if self.keep:  # the tensors this run allocated up front, and the views of them
                # but the inputs' (made again from each run's new input array, above)
                kept = {i: views[i] for i in prepared.allocated if views[i] is not None}
                kept |= {i: views[i] for i in prepared.bound_views
                         if owners[i] in kept and views[i] is not None
                         and tensors[owners[i]].init != "input"}  # fmt: skip
                self._kept = (prepared, kept)
            for i in prepared.unbound:
                views[i] = None  # views of run memory; inout: the caller's, for this run only
            for i in prepared.arena_owned:
                if views[i] is not None:
                    if not self.keep or i not in kept:
                        self.arena.release(views[i])
                    views[i] = None
        self.counters.add_run(result)
        COUNTERS.add(siw_issued=result.words_issued, programs_run=1,
                     **{f"pipe_busy_ns_{pipe}": ns for pipe, ns in result.busy_ns.items()})  # fmt: skip
        return result

    def _issue(
        self,
        program: Program,
        plan: list[tuple],
        rebinds: list[Callable[[int], None] | None],
        trace: bool,
        cancel: threading.Event,
    ) -> RunResult:
        perf = time.perf_counter_ns
        worker = self._s_pipe if self.overlap else None
        intervals: list[tuple[str, int, int, int]] | None = [] if trace else None
        loop_left = [-1] * len(plan)  # back-jumps still to take per LOOP word; -1 = not entered
        busy_d = busy_s = busy_c = 0
        issued = loops = ops = 0
        pc = 0
        start = perf()
        try:
            while True:
                if cancel.is_set():
                    raise RunCancelled(f"word {pc}: run cancelled", pc)
                d, s, c, target, count, order, word_ops = plan[pc]
                issued += 1
                if s is None:
                    if d is not None:
                        t0 = perf()
                        d()
                        t1 = perf()
                        busy_d += t1 - t0
                        ops += word_ops if word_ops.__class__ is int else word_ops()
                        if trace:
                            intervals.append(("D", pc, t0, t1))
                elif d is None:
                    t0 = perf()
                    s()
                    t1 = perf()
                    busy_s += t1 - t0
                    if trace:
                        intervals.append(("S", pc, t0, t1))
                elif order == siw.ORDER_PARALLEL and worker is not None:
                    worker.submit(s)
                    t0 = perf()
                    try:
                        d()
                    finally:
                        t1 = perf()
                        s0, s1, error = worker.result()
                    if error is not None:
                        raise error
                    busy_d += t1 - t0
                    busy_s += s1 - s0
                    ops += word_ops if word_ops.__class__ is int else word_ops()
                    if trace:
                        intervals.append(("D", pc, t0, t1))
                        intervals.append(("S", pc, s0, s1))
                else:
                    first, second = (d, s) if order == siw.ORDER_D_FIRST else (s, d)
                    t0 = perf()
                    first()
                    t1 = perf()
                    second()
                    t2 = perf()
                    d_ns, s_ns = (t1 - t0, t2 - t1) if first is d else (t2 - t1, t1 - t0)
                    busy_d += d_ns
                    busy_s += s_ns
                    ops += word_ops if word_ops.__class__ is int else word_ops()
                    if trace:
                        d_iv, s_iv = ((t0, t1), (t1, t2)) if first is d else ((t1, t2), (t0, t1))
                        intervals.append(("D", pc, *d_iv))
                        intervals.append(("S", pc, *s_iv))
                if c:
                    if c == COp.HALT:
                        break
                    if c == COp.LOOP:
                        t0 = perf()
                        left = loop_left[pc]
                        if left < 0:
                            left = count
                        rebind = rebinds[pc]
                        if left > 0:
                            loop_left[pc] = left - 1
                            loops += 1
                            if rebind is not None:  # the register: the next pass's index
                                rebind(count - left + 1)
                            busy_c += perf() - t0
                            pc = target
                            continue
                        loop_left[pc] = -1  # leaving: an enclosing loop re-enters it afresh
                        if rebind is not None:
                            rebind(0)
                        busy_c += perf() - t0
                pc += 1
        except RunError:
            raise
        except Exception as exc:
            raise RunError(f"{siw.word_text(program, pc)} failed: {exc}", pc) from exc
        wall = perf() - start
        return RunResult(
            outputs={},
            words_issued=issued,
            loops_taken=loops,
            busy_ns={"D": busy_d, "S": busy_s, "C": busy_c},
            wall_ns=wall,
            setup_ns=0,
            ops=ops,
            sentron_id=self.sentron_id,
            intervals=intervals,
        )


@dataclass
class Prepared:
    """A validated program with its resident tensors bound and its words planned (see
    Sentron.prepare); run it on the sentron that prepared it, one run at a time."""

    program: Program
    views: list  # one slot per tensor: resident arrays stay bound, the rest per run
    plan: list[tuple]
    allocated: list[int]  # tensors that take arena memory for a run (not scratch)
    bound_views: list[int]  # views of those, rebuilt per run
    owners: list[int]
    arena_bytes: int
    inout: list[int]  # tensors bound in place to the caller's arrays per run (KV caches)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Index lists a run walks instead of every tensor (a decoder's program declares hundreds of
    # residents): the inputs it checks, the outputs it copies, the arena memory it gives back
    # (allocated and scratch) and the slots it unbinds (views of those, inout tensors).
    declared: list[siw.TensorSpec] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    arena_owned: list[int] = field(default_factory=list)
    unbound: list[int] = field(default_factory=list)
    # Register-relative views, and per word the rebind a C.loop with a register calls (None
    # for every other word).
    register_views: list[_RegisterView] = field(default_factory=list)
    rebinds: list[Callable[[int], None] | None] = field(default_factory=list)
    # Allocated tensors the program overwrites whole before reading (siw.written_first): a run
    # leaves them uninitialised.
    written_first: set[int] = field(default_factory=set)


def _register_plan(
    program: Program, owners: list[int], v: list
) -> tuple[list[_RegisterView], list[Callable[[int], None] | None]]:
    """Each register-relative view, and for each C.loop that drives a register the rebind of
    the views on it that its body uses (only those: validation checked them in range for
    this loop's count, not others)."""
    tensors = program.tensors
    register_views = {
        i: _RegisterView(i, owners[i], t, tensors[owners[i]].init == "resident")
        for i, t in enumerate(tensors) if t.reg is not None
    }  # fmt: skip
    rebinds: list[Callable[[int], None] | None] = [None] * len(program.words)
    if not register_views:
        return [], rebinds
    names = siw.SIW_DTYPE.names
    used = [
        {t for _, t in siw.register_operands(program, dict(zip(names, row, strict=True)))}
        for row in program.words.tolist()
    ]  # fmt: skip
    for loop in siw.loops_of(program.words):
        if loop.reg is None:
            continue
        body = set().union(*used[loop.target : loop.end + 1])
        mine = [register_views[t] for t in sorted(body) if tensors[t].reg == loop.reg]
        rebinds[loop.end] = _rebinder(mine, v, loop.count + 1)
    return list(register_views.values()), rebinds


def _bind_resident(program: Program, resident: Mapping[str, np.ndarray], views: list) -> None:
    declared = [(i, t) for i, t in enumerate(program.tensors) if t.init == "resident"]
    missing = sorted(t.name for _, t in declared if t.name not in resident)
    if missing:
        raise RunError(
            f"resident tensor(s) {', '.join(missing)} are not registered on this node: load the"
            " model that provides them"
        )
    for i, spec in declared:
        value = resident[spec.name]
        if spec.dtype in siw.PACKED_WEIGHTS:
            _check_packed_binding(spec, value)
            views[i] = value
            continue
        want = np.dtype(siw.NUMPY_DTYPES[spec.dtype])
        if (
            not isinstance(value, np.ndarray)
            or value.dtype != want
            or value.shape != spec.shape
            or not value.flags.c_contiguous
        ):
            got = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else "?"
            raise RunError(
                f"resident tensor {spec.name!r} is {got}; the program declares"
                f" {spec.dtype}{list(spec.shape)} (dense)"
            )
        views[i] = value


def _check_packed_binding(spec: siw.TensorSpec, value: object) -> None:
    """A packed resident is bound to its dtype's weight class with the declared (K, N) and
    sound parts; a (layers, K, N) stack to a tuple or list of `layers` of them."""
    kind = LINEAR_WEIGHTS[spec.dtype][0]
    weights = value if len(spec.shape) == 3 else [value]
    count = spec.shape[0] if len(spec.shape) == 3 else 1
    what = f"{spec.dtype}{list(spec.shape)}"
    if len(spec.shape) == 3 and (not isinstance(value, tuple | list) or len(value) != count):
        raise RunError(
            f"resident tensor {spec.name!r}: the program declares {what}, a stack of {count}"
            f" {kind.__name__}s; bind a tuple of {count}"
        )
    for layer, weight in enumerate(weights):
        at = f" (layer {layer})" if len(spec.shape) == 3 else ""
        if type(weight) is not kind:
            raise RunError(
                f"resident tensor {spec.name!r}{at} is {type(weight).__name__}; the program"
                f" declares {what}, a {kind.__name__}"
            )
        if linear_weight_shape(weight) != spec.shape[-2:]:
            raise RunError(
                f"resident tensor {spec.name!r}{at} is a (K, N) = "
                f"{linear_weight_shape(weight)} weight; the program declares {what}"
            )
        wrong = _packed_parts(weight)
        if wrong is not None:
            raise RunError(
                f"resident tensor {spec.name!r}{at}: a malformed {kind.__name__}: {wrong}"
            )


_NUMPY_DTYPES = {name: np.dtype(t) for name, t in siw.NUMPY_DTYPES.items()}


def _check_inputs(
    program: Program,
    inputs: Mapping[str, np.ndarray],
    specs: list[siw.TensorSpec] | None = None,
) -> None:
    """`specs`: the program's input and inout tensors, when the caller has them listed."""
    if specs is None:
        specs = [t for t in program.tensors if t.init in ("input", "inout")]
    if len(inputs) == len(specs) and all(  # the usual case, without building a message
        (value := inputs.get(t.name)).__class__ is np.ndarray
        and value.dtype == _NUMPY_DTYPES[t.dtype]
        and value.shape == t.shape
        and t.init == "input"
        for t in specs
    ):
        return
    declared = {t.name: t for t in specs}
    missing = sorted(set(declared) - set(inputs))
    if missing:
        raise RunError(f"missing input(s) {', '.join(missing)}: pass them by name in `inputs`")
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise RunError(
            f"unknown input(s) {', '.join(unknown)}; the program's inputs are"
            f" {', '.join(sorted(declared)) or 'none'}"
        )
    for name, spec in declared.items():
        value = inputs[name]
        want = np.dtype(siw.NUMPY_DTYPES[spec.dtype])
        if not isinstance(value, np.ndarray):
            raise RunError(f"input {name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != want or value.shape != spec.shape:
            raise RunError(
                f"input {name!r} is {value.dtype}{list(value.shape)}; the program declares"
                f" {spec.dtype}{list(spec.shape)}: pass an array of that shape, e.g."
                f" x.astype(np.{want.name})"
            )
    _check_inout(specs, inputs)


def _check_inout(specs: list[siw.TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """`inout` arrays are written in place: each must be dense, writeable and apart from the
    others (two caches on one buffer would race)."""
    spans = []
    for spec in specs:
        if spec.init != "inout":
            continue
        value = inputs[spec.name]
        if not value.flags.c_contiguous or not value.flags.writeable:
            raise RunError(
                f"inout {spec.name!r} is updated in place: pass a C-contiguous, writeable array"
            )
        start = value.__array_interface__["data"][0]
        spans.append((start, start + value.nbytes, spec.name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise RunError(f"inout {first!r} and {second!r} share memory; give each its own array")


def _initialise(view: np.ndarray, spec: siw.TensorSpec, inputs: Mapping[str, np.ndarray]) -> None:
    if spec.init == "input":
        np.copyto(view, inputs[spec.name])
    elif spec.init == "zeros":
        view.fill(0)
    elif spec.init == "ones":
        view.fill(1)
    elif spec.init == "random":
        view[...] = random_tensor(spec)


def random_tensor(spec: siw.TensorSpec) -> np.ndarray:
    """The values a `random(seed)` tensor starts with (documented in siw)."""
    rng = np.random.default_rng(spec.seed)
    if spec.dtype == "f32":
        return rng.random(spec.shape, dtype=np.float32) * 2 - 1
    if spec.dtype == "bf16":  # the high 16 bits of f32 values in [-1, 1)
        return ((rng.random(spec.shape, dtype=np.float32) * 2 - 1).view(np.uint32) >> 16).astype(
            np.uint16
        )
    if spec.dtype == "i8":
        return rng.integers(-127, 128, spec.shape, dtype=np.int8)
    return rng.integers(0, 100, spec.shape, dtype=siw.NUMPY_DTYPES[spec.dtype])


# ---------------------------------------------------------------------------------- parallel


def run_parallel(
    programs_and_inputs: Iterable[tuple[Program | bytes | str, Mapping[str, np.ndarray]]],
    n_sentrons: int,
    *,
    arena_bytes: int | None = None,
    overlap: bool = True,
    limits: Limits = siw.DEFAULT_LIMITS,
) -> list[RunResult]:
    """Run programs on n_sentrons sentrons, one per worker thread pinned to a CPU where the OS
    allows; sentron j takes programs j, j + n, ... Results come back in the programs' order."""
    if n_sentrons < 1:
        raise ValueError(f"n_sentrons must be >= 1, got {n_sentrons}")
    items = [(_as_program(p, limits, True), dict(inp)) for p, inp in programs_and_inputs]
    results: list[RunResult | None] = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []

    def work(j: int) -> None:
        if cpus:
            try:
                os.sched_setaffinity(0, {cpus[j % len(cpus)]})  # 0 = this thread on Linux
            except OSError:
                pass
        mine = range(j, len(items), n_sentrons)
        capacity = arena_bytes or max(arena_bytes_for(items[i][0]) for i in mine)
        with Sentron(Arena(capacity), sentron_id=j, overlap=overlap) as sentron:
            for i in mine:
                try:
                    results[i] = sentron.run(items[i][0], items[i][1], validate=False)
                except Exception as exc:
                    errors[i] = exc

    threads = [
        threading.Thread(target=work, args=(j,), name=f"sentron{j}")
        for j in range(min(n_sentrons, len(items)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, error in enumerate(errors):
        if error is not None:
            raise RunError(f"program {i} failed: {error}") from error
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- builders


def tiled_gemm_program(m: int, k: int, n: int, tile_rows: int) -> Program:
    """C(m,n) = A(m,k) @ B(k,n), streaming B through a double buffer of `tile_rows` rows.

    B (input "b") is read tile by tile: word t+1 computes C += A_t @ buf[t % 2] on D while S loads
    tile t+1 of B into buf[(t+1) % 2]. A arrives as column panels a0, a1, ... (m, tile_rows), the
    operand each tile multiplies (see tiled_gemm_inputs)."""
    if min(m, k, n, tile_rows) < 1 or k % tile_rows:
        raise ValueError(f"tile_rows={tile_rows} must divide k={k} (and all sizes be >= 1)")
    tiles = k // tile_rows
    lines = [f".tensor a{t} f32[{m},{tile_rows}] input" for t in range(tiles)]
    lines += [
        f".tensor b f32[{k},{n}] input",
        f".tensor buf0 f32[{tile_rows},{n}]",
        f".tensor buf1 f32[{tile_rows},{n}]",
        f".tensor c f32[{m},{n}] output",
        f"S.load buf0, b tile=0 rows={tile_rows}",
    ]
    for t in range(tiles):
        word = f"D.gemm c, a{t}, buf{t % 2}" + (" acc" if t else "")
        if t + 1 < tiles:
            word += f" | S.load buf{(t + 1) % 2}, b tile={t + 1} rows={tile_rows}"
        lines.append(word + (" | C.halt" if t + 1 == tiles else ""))
    return siw.assemble("\n".join(lines))


def tiled_gemm_inputs(
    m: int, k: int, n: int, tile_rows: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs for tiled_gemm_program and the product they should give (float64 reference)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    inputs = {
        f"a{t}": np.ascontiguousarray(a[:, t * tile_rows : (t + 1) * tile_rows])
        for t in range(k // tile_rows)
    }
    inputs["b"] = b
    return inputs, a.astype(np.float64) @ b.astype(np.float64)


def measure_overlap(
    m: int = 32, k: int = 16384, n: int = 1024, tile_rows: int = 1024, repeats: int = 5
) -> dict:
    """Run the tiled GEMM with overlap on and off, interleaved in one process; medians.

    overlap_fraction = (D + S - wall) / min(D, S): 1 when the shorter pipe hides entirely under
    the longer, 0 when they run back to back."""
    program = tiled_gemm_program(m, k, n, tile_rows)
    inputs, _ = tiled_gemm_inputs(m, k, n, tile_rows)
    capacity = arena_bytes_for(program)
    modes = {"overlap": True, "serial": False}
    runs: dict[str, list[RunResult]] = {name: [] for name in modes}
    sentrons = {name: Sentron(Arena(capacity), overlap=on) for name, on in modes.items()}
    try:
        for _ in range(repeats):
            for name, sentron in sentrons.items():
                runs[name].append(sentron.run(program, inputs, validate=False))
    finally:
        for sentron in sentrons.values():
            sentron.close()
    report: dict = {"shape": {"m": m, "k": k, "n": n, "tile_rows": tile_rows}, "repeats": repeats}
    for name, results in runs.items():
        d = statistics.median(r.busy_ns["D"] for r in results)
        s = statistics.median(r.busy_ns["S"] for r in results)
        wall = statistics.median(r.wall_ns for r in results)
        fractions = [
            (r.busy_ns["D"] + r.busy_ns["S"] - r.wall_ns) / min(r.busy_ns["D"], r.busy_ns["S"])
            for r in results
        ]
        report[name] = {
            "d_busy_ns": int(d),
            "s_busy_ns": int(s),
            "wall_ns": int(wall),
            "overlap_fraction": round(statistics.median(fractions), 3),
            "gflops": round(results[0].ops / wall, 2),
        }
    report["wall_speedup"] = round(report["serial"]["wall_ns"] / report["overlap"]["wall_ns"], 3)
    return report


def issue_overhead_ns(n_words: int = 100000, repeats: int = 5) -> float:
    """Median ns to issue one NOP word (a program of n_words NOPs then C.halt)."""
    words = siw.empty_words(n_words + 1)
    words["c_op"][-1] = COp.HALT
    program = Program([siw.TensorSpec("unused", "f32", (1,))], words)
    siw.validate(program, Limits(max_words=n_words + 1))
    times = []
    with Sentron(Arena(1 << 12)) as sentron:
        for _ in range(repeats):
            times.append(sentron.run(program, validate=False).wall_ns / (n_words + 1))
    return statistics.median(times)
