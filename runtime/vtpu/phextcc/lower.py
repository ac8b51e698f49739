"""phextcc's last passes: a compiled graph lowered to SIW words that the sentron executes.

Shapes in the IR are symbolic (`B`, `S`); SIW tensors are not, so a `SiwModule` lowers the graph
once per (batch, seq) shape it meets and keeps the prepared programs (validated, resident
weights bound, words planned) in a small LRU cache. Lowering:

- weights become `resident` tensors, bound by name to the graph's arrays (never copied); each
  residual norm's gamma and beta are stacked once into one (2, n) resident tensor, the operand
  D.add_layernorm reads;
- every IR value gets a dense row-major buffer of (rows, last axis) — a plain tensor the arena
  allocates per run — reused by the next value of the same shape once its last reader has run,
  and written over in place where the op allows it and its first operand dies with it (as
  `plan_in_place` and the hand-written forward do);
- reshapes are views: `ids` (B, S) read as (B*S,) by S.gather, a buffer read as (B, S, n) by
  attention and pooling or as (B, S*n) to add the position table's first S rows, itself a view
  of the resident table;
- one op becomes one slot; `pack_words` then packs an S op into the previous word's S slot
  when the two are independent (they issue concurrently) and C.halt into the last word.

The program computes exactly what `phextcc.run` computes, with the same kernels in the same
order (tested bit for bit); `SiwModule.forward` is the chunk forward the embeddings path uses.

`DecoderModule` lowers a compiled Qwen3 graph the same way (`lower_decoder`), per (batch,
tokens): packed weights as resident f32 / bf16 / i8 tensors (+ an int8 scale) read in place by
D.matmul and D.rows, one D op per IR op (rmsnorm, matmul, qk_norm_rope, attn_gqa, add_rmsnorm
writing the residual sum over its first operand, swiglu; for decode kv_append and cached_attn
over the caller's dense caches bound as `inout` tensors), one word per op: 3 + 9 per layer for
prefill, 3 + 10 per layer for decode (283 words for Qwen3-0.6B's 28 layers). Its prefill and step
equal phextcc.qwen3.prefill / decode bit for bit in fp32, bf16 and int8.

Paged (`DecoderModule(graph, paged=Paged(...))`, what Qwen3Model.compile builds): the same
lowering over the node's paged KV cache -- qk_norm_rope + kv_append become D.kv_store_paged and
the attention D.paged_attn, the arena an `inout` tensor `kv`, the step's rotary rows and page
table (frames from the PPT) inputs -- per (batch, tokens this step, logits); 3 + 9 per layer
(255 words for Qwen3-0.6B's decode step). Equal to the hand-written forward bit for bit.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vtpu import siw
from vtpu.arena import Arena
from vtpu.kernels.decoder import rope_inv_freq
from vtpu.phextcc import CompileError, Graph
from vtpu.sentron import Prepared, Sentron, arena_bytes_for
from vtpu.siw import COp, DOp, Program, SOp, TensorSpec

_IN_PLACE = {"layer_norm", "add_layer_norm", "l2_normalize", "add_positions", "add", "add_row",
             "gelu"}  # fmt: skip
_ACT = {None: 0, "none": 0, "relu": 1, "gelu": 2, "silu": 3}


def _f32_bits(value: float) -> int:
    return int(np.float32(value).view(np.uint32))


def siw_name(name: str, taken: set[str]) -> str:
    """A graph name as an SIW tensor name: letters, digits, _; at most 64; unique."""
    base = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "t"
    if not re.match(r"[A-Za-z_]", base):
        base = "t_" + base
    out, n = base[: siw.MAX_NAME], 1
    while out in taken or out in ("causal", "acc"):
        suffix = f"_{n}"
        out, n = base[: siw.MAX_NAME - len(suffix)] + suffix, n + 1
    taken.add(out)
    return out


class _Builder:
    """Tensors and single-slot instructions of one program being lowered."""

    def __init__(self) -> None:
        self.tensors: list[TensorSpec] = []
        self.ids: dict[str, int] = {}
        self.taken: set[str] = set()
        self.slots: list[tuple[str, dict]] = []  # ("D" | "S", fields)
        self.views: dict[tuple, str] = {}

    def tensor(self, name: str, dtype: str, shape: tuple[int, ...], init: str, **kw) -> str:
        name = siw_name(name, self.taken)
        self.ids[name] = len(self.tensors)
        self.tensors.append(TensorSpec(name, dtype, tuple(shape), init, **kw))
        return name

    def view(self, base: str, shape: tuple[int, ...], offset: int = 0) -> str:
        spec = self.tensors[self.ids[base]]
        if spec.shape == tuple(shape) and offset == 0:
            return base
        key = (base, tuple(shape), offset)
        if key not in self.views:
            self.views[key] = self.tensor(
                f"{base}_v{len(self.views)}", spec.dtype, shape, "view",
                base=base, offset=offset, strides=siw.c_strides(tuple(shape)),
            )  # fmt: skip
        return self.views[key]

    def d(self, op: DOp, dst: str, *srcs: str | None, flags: int = 0, imm: float = 0.0) -> None:
        fields = {"d_op": int(op), "d_flags": flags, "d_imm": _f32_bits(imm) if imm else 0,
                  "d_dst": self.ids[dst]}  # fmt: skip
        for f, name in zip(("d_a", "d_b", "d_c", "d_e"), srcs, strict=False):
            fields[f] = siw.NONE if name is None else self.ids[name]
        self.slots.append(("D", fields))

    def s(self, op: SOp, dst: str, src: str, idx: str) -> None:
        ids = self.ids
        fields = {"s_op": int(op), "s_dst": ids[dst], "s_src": ids[src], "s_idx": ids[idx]}
        self.slots.append(("S", fields))


def pack_words(program: Program, slots: list[tuple[str, dict]]) -> np.ndarray:
    """Single-slot instructions in program order -> SIW words: an S op shares the previous
    word when that word's S slot is free and neither slot touches what the other writes (so
    they issue concurrently), and C.halt rides on the last word."""
    words = siw.empty_words(len(slots) or 1)
    n = 0
    owners = siw.roots(program)
    for pipe, fields in slots:
        if pipe == "S" and n:
            prev = words[n - 1]
            if prev["s_op"] == 0 and prev["c_op"] == 0:
                trial = prev.copy()
                for k, v in fields.items():
                    trial[k] = v
                w = dict(zip(siw.SIW_DTYPE.names, trial.tolist(), strict=True))
                d_reads, d_writes, s_reads, s_writes = siw._rw_sets(w, owners)
                if not (d_writes & (s_reads | s_writes) or s_writes & d_reads):
                    words[n - 1] = trial
                    continue
        for k, v in fields.items():
            words[k][n] = v
        n += 1
    words = words[: max(n, 1)]
    words["c_op"][-1] = COp.HALT
    return words


def lower(
    graph: Graph, bsz: int, seq: int, resident_names: dict[str, str], stacked: dict
) -> tuple[Program, str]:
    """The graph as one SIW program for (bsz, seq); returns it and its output tensor's name.
    `resident_names` maps graph weight names (and stacked (gamma, beta) pairs) to SIW names."""
    b = _Builder()
    weights = graph.weights

    def dims(shape) -> tuple[int, ...]:
        return tuple(bsz if d == "B" else seq if d == "S" else int(d) for d in shape)

    for gname, sname in resident_names.items():
        array = stacked[gname] if isinstance(gname, tuple) else weights[gname]
        b.tensor(sname, "f32", array.shape, "resident")
    feeds = {}
    for name in graph.inputs:
        v = graph.values[name]
        feeds[name] = b.tensor(name, v.dtype, dims(v.shape), "input")
    last_use: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            last_use[name] = i
    buffer_of: dict[str, str] = {}  # IR value -> SIW buffer holding it
    free: dict[tuple[int, ...], list[str]] = {}
    buffers: list[str] = []
    outputs = set(graph.outputs)

    def operand(name: str) -> str:
        if name in buffer_of:
            return buffer_of[name]
        if name in feeds:
            return feeds[name]
        if name in weights:
            return resident_names[name]
        raise CompileError(f"{name} is read before any op produces it")

    def buffer(value: str, shape: tuple[int, ...]) -> str:
        pool = free.get(shape)
        if pool and value not in outputs:
            return pool.pop()
        name = value if value in outputs else f"act{len(buffers)}"
        buffers.append(name)
        return b.tensor(name, "f32", shape, "zeros", output=value in outputs)

    for i, op in enumerate(graph.ops):
        shape = dims(graph.shape(op.output))
        flat = (int(np.prod(shape[:-1])), shape[-1])
        inputs = op.inputs[:2] if op.kind == "add_layer_norm" else op.inputs  # + stacked gb
        srcs = [operand(name) for name in inputs]
        first = op.inputs[0] if op.inputs else None
        if (
            op.kind in _IN_PLACE
            and first in buffer_of
            and last_use.get(first) == i
            and op.inputs.count(first) == 1
            and op.output not in outputs
        ):
            dst = buffer_of[first]
        else:
            dst = buffer(op.output, flat)
        _emit(b, op, dst, srcs, shape, bsz, seq, stacked, resident_names)
        buffer_of[op.output] = dst
        for name in set(op.inputs):
            held = buffer_of.get(name)
            if held is not None and last_use.get(name) == i and held != dst:
                free.setdefault(b.tensors[b.ids[held]].shape, []).append(held)
    program = Program(b.tensors)
    program.words = pack_words(program, b.slots)
    (out,) = graph.outputs
    return program, buffer_of[out]


def _emit(b: _Builder, op, dst: str, srcs: list[str], shape, bsz, seq, stacked, names) -> None:
    kind, attrs = op.kind, op.attrs
    if kind == "gather":
        table, ids = srcs
        b.s(SOp.GATHER, dst, table, b.view(ids, (bsz * seq,)))
    elif kind == "add_positions":
        x, table = srcs
        width = shape[-1]
        row = b.view(table, (seq * width,))
        xv = b.view(x, (bsz, seq * width))
        b.d(DOp.ADD, b.view(dst, (bsz, seq * width)), xv, row)
    elif kind in ("add", "add_row"):
        b.d(DOp.ADD, dst, *srcs)
    elif kind == "layer_norm":
        b.d(DOp.LAYERNORM, dst, *srcs, imm=attrs["eps"])
    elif kind == "add_layer_norm":
        gb = names[(op.inputs[2], op.inputs[3])]
        b.d(DOp.ADD_LAYERNORM, dst, srcs[0], srcs[1], gb, imm=attrs["eps"])
    elif kind == "linear":
        bias = srcs[2] if len(srcs) > 2 else None
        if attrs.get("trans_w"):
            raise CompileError(f"{op.text()}: run pack_weights before lowering")
        b.d(DOp.LINEAR, dst, srcs[0], srcs[1], bias, flags=_ACT[attrs.get("act")])
    elif kind == "gelu":
        b.d(DOp.GELU, dst, srcs[0])
    elif kind == "attention":
        if not attrs.get("packed"):
            raise CompileError(f"{op.text()}: only packed QKV attention lowers (run fuse_qkv)")
        qkv, lengths = srcs
        width = shape[-1]
        b.d(DOp.ATTN_QKV, b.view(dst, (bsz, seq, width)), b.view(qkv, (bsz, seq, 3 * width)),
            lengths, flags=attrs["heads"])  # fmt: skip
    elif kind == "mean_pool":
        x, lengths = srcs
        width = shape[-1]
        b.d(DOp.MEAN_POOL, dst, b.view(x, (bsz, seq, width)), lengths)
    elif kind == "l2_normalize":
        b.d(DOp.L2NORM, dst, srcs[0])
    else:
        raise CompileError(f"{op.text()}: no SIW lowering for {kind!r}")


class _Programs:
    """Prepared programs per shape key on one sentron (an LRU of `cache_size`), against the
    resident tensors `self.resident`; subclasses say how a key lowers (`program(*key)`)."""

    resident: dict[str, np.ndarray]

    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self._prepared: OrderedDict[tuple[int, ...], tuple[Prepared, str]] = OrderedDict()
        self._sentron: Sentron | None = None
        self._lock = threading.Lock()

    def program(self, *key: int) -> tuple[Program, str]:
        raise NotImplementedError

    def _get(self, *key: int) -> tuple[Prepared, str]:
        hit = self._prepared.get(key)
        if hit is not None:
            self._prepared.move_to_end(key)
            return hit
        program, out = self.program(*key)
        need = arena_bytes_for(program)
        if self._sentron is None or self._sentron.arena.capacity < need:
            if self._sentron is not None:
                self._sentron.close()
            self._sentron = Sentron(Arena(need), overlap=False)
            self._prepared.clear()  # prepared programs belong to the sentron that planned them
        hit = (self._sentron.prepare(program, self.resident), out)
        self._prepared[key] = hit
        while len(self._prepared) > self.cache_size:
            self._prepared.popitem(last=False)
        return hit

    def close(self) -> None:
        if self._sentron is not None:
            self._sentron.close()


class SiwModule(_Programs):
    """A compiled graph as SIW: programs per (batch, seq) shape, run on one sentron against the
    graph's resident weights. `forward(ids, lengths)` is a chunk forward for
    BertEncoder.encode_ids; one forward runs at a time."""

    def __init__(self, graph: Graph, *, cache_size: int = 32) -> None:
        super().__init__(cache_size)
        self.graph = graph
        taken: set[str] = set()
        self.names: dict = {}
        self.stacked: dict[tuple[str, str], np.ndarray] = {}
        for op in graph.ops:
            if op.kind == "add_layer_norm":
                pair = (op.inputs[2], op.inputs[3])
                if pair not in self.stacked:
                    self.stacked[pair] = np.ascontiguousarray(
                        np.stack([graph.weights[pair[0]], graph.weights[pair[1]]]),
                        dtype=np.float32,
                    )
        used = {name for op in graph.ops for name in op.inputs if name in graph.weights}
        for op in graph.ops:
            for j, name in enumerate(op.inputs):
                if op.kind == "add_layer_norm" and j >= 2:
                    continue
                if name in used and name not in self.names:
                    self.names[name] = siw_name(name, taken)
        for pair in self.stacked:
            self.names[pair] = siw_name(f"{pair[0]}_and_beta", taken)
        self.resident = {
            self.names[k]: (self.stacked[k] if isinstance(k, tuple) else graph.weights[k])
            for k in self.names
        }

    @property
    def resident_bytes(self) -> int:
        """Bytes the stacked norm parameters add to the graph's weights."""
        return sum(a.nbytes for a in self.stacked.values())

    def program(self, bsz: int, seq: int) -> tuple[Program, str]:
        return lower(self.graph, bsz, seq, self.names, self.stacked)

    def run(self, ids: np.ndarray, lengths: np.ndarray):
        """One forward: ids (B, S) int64, lengths (B,) int32 -> the sentron's RunResult."""
        with self._lock:
            prepared, _ = self._get(*ids.shape)
            return self._sentron.run(prepared, {"ids": ids, "lengths": lengths})

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with self._lock:
            prepared, out = self._get(*ids.shape)
            result = self._sentron.run(prepared, {"ids": ids, "lengths": lengths})
        return result.outputs[out]


def forward(graph: Graph) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A compiled graph's SIW chunk forward (see SiwModule)."""
    return SiwModule(graph).forward


# ---- the decoder (Qwen3) ---------------------------------------------------------------------

_SIW_DTYPE = {np.dtype(np.float32): "f32", np.dtype(np.uint16): "bf16", np.dtype(np.int8): "i8"}


class DecoderModule(_Programs):
    """A compiled decoder graph (phextcc.qwen3: prefill, or decode with its dense per-layer KV
    caches) as SIW programs, one per (batch, tokens) shape — tokens the prompt length of a
    prefill, the cache length T of a decode — run on one sentron against the graph's resident
    packed weights.

    Residents: each packed weight's data (f32, bf16 bits or i8 (N, K)) and, for int8, its
    per-row scale (`NAME_scale`), bound by name and read in place by D.matmul and D.rows (one
    table for the embedding and a tied lm_head); the norms' gammas; per attention block q's and
    k's head gammas stacked (2, head_dim) and the rotary inverse frequencies, the operands of
    D.qk_norm_rope. A decode program binds the caches as `inout` tensors (the caller's arrays,
    written in place by D.kv_append, never copied). `prefill` and `decode` equal
    phextcc.qwen3.prefill / decode bit for bit (same kernels, same order).

    Paged (`paged=Paged(...)`): the programs read and write the node's KV arena instead
    (vtpu.models.kvcache, bound `inout` as `kv`), through D.kv_store_paged and D.paged_attn,
    with the step's rotary rows (`rope`) and page table (`pages`, the PPT's frames) as inputs;
    one program per (batch, tokens this step, logits) -- the cache's length is no shape, the
    pages are indirect. `run_paged` runs a step; vtpu.models.qwen3.Qwen3Model.compile uses it,
    and its logits equal the hand-written forward's bit for bit."""

    def __init__(self, graph: Graph, *, cache_size: int = 32, paged: Paged | None = None) -> None:
        from vtpu.kernels import packed

        super().__init__(cache_size)
        if graph.precision is None:
            raise CompileError(f"{graph.name}: not a decoder graph (no packed precision)")
        self.graph = graph
        self.paged = paged
        self.decode = any(op.kind == "kv_append" for op in graph.ops)
        taken: set[str] = {"ids", "positions"}
        # graph cache inputs -> SIW names, as lower_decoder's builder names them
        self._cache_names = {k: siw_name(k, set()) for k in graph.inputs if k.startswith("cache.")}
        self.names: dict[str, tuple[str, ...]] = {}  # graph weight -> SIW name(s)
        self.resident: dict[str, np.ndarray] = {}
        for op in graph.ops:
            for name in op.inputs:
                w = graph.weights.get(name)
                if w is None or name in self.names:
                    continue
                if isinstance(w, packed.PackedWeight):
                    parts = [siw_name(name, taken)]
                    self.resident[parts[0]] = w.data
                    if w.scale is not None:
                        parts.append(siw_name(f"{name}_scale", taken))
                        self.resident[parts[1]] = w.scale
                    self.names[name] = tuple(parts)
                elif op.kind != "qk_norm_rope":
                    self.names[name] = (siw_name(name, taken),)
                    self.resident[self.names[name][0]] = w
        for op in graph.ops:  # q and k head gammas stacked; rotary frequencies, one per theta
            if op.kind == "qk_norm_rope":
                d, theta = op.attrs["head_dim"], op.attrs["theta"]
                gammas = np.stack([graph.weights[op.inputs[1]], graph.weights[op.inputs[2]]])
                self.names[op.output] = (siw_name(f"{op.output}.gammas", taken),)
                self.resident[self.names[op.output][0]] = np.ascontiguousarray(gammas, np.float32)
                key = f"rope_{d}_{theta:g}"
                if key not in self.names:
                    self.names[key] = (siw_name(f"rope.inv_freq.{d}.{theta:g}", taken),)
                    self.resident[self.names[key][0]] = rope_inv_freq(theta, d)

    @property
    def resident_bytes(self) -> int:
        """Bytes the stacked head gammas and rotary tables add to the graph's weights."""
        extra = [parts[0] for key, parts in self.names.items() if key not in self.graph.weights]
        return sum(self.resident[name].nbytes for name in extra)

    def program(self, bsz: int, tokens: int, logits: int = 1) -> tuple[Program, str | None]:
        if bsz < 1 or tokens < 1:
            raise CompileError(f"batch {bsz} x {tokens} tokens: both must be at least 1")
        return lower_decoder(self.graph, bsz, tokens, self.names, self.resident,
                             paged=self.paged, with_logits=bool(logits))  # fmt: skip

    def run_paged(
        self, ids: np.ndarray, rope: np.ndarray, pages: np.ndarray, kv: np.ndarray, *,
        logits: bool = True,
    ) -> np.ndarray | None:  # fmt: skip
        """One paged step: ids (B, S) int64, rope (2, B * S, head_dim) cos then sin, pages
        (B, 1 + max_pages) int64 (siw: "The node's paged KV cache"), kv the arena (written in
        place) -> logits (B, vocab) (prefill: (1, vocab), the last position's), or None when
        logits=False (a prefill chunk before the last)."""
        if self.paged is None:
            raise ValueError("run_paged: this module lowers dense caches (pass paged=)")
        bsz, seq = ids.shape
        feeds = {"ids": ids, "rope": rope, "pages": pages, "kv": kv}
        with self._lock:
            prepared, out = self._get(bsz, seq, int(logits))
            result = self._sentron.run(prepared, feeds)
        return result.outputs[out] if out is not None else None

    def run(self, inputs: dict[str, np.ndarray], bsz: int, tokens: int):
        """One run: the sentron's RunResult (logits in outputs)."""
        with self._lock:
            prepared, _ = self._get(bsz, tokens)
            return self._sentron.run(prepared, inputs)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Logits (B, S, vocab) of prompts `ids` (B, S) from position 0."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.decode or ids.ndim != 2:
            raise ValueError(f"prefill: a prefill graph and ids (B, S); got ids {ids.shape}")
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
        result = self.run({"ids": ids, "positions": positions}, *ids.shape)
        (logits,) = result.outputs.values()
        return logits.reshape(*ids.shape, -1)

    def step(self, cache: dict[str, np.ndarray], ids, positions) -> np.ndarray:
        """One decode step: `ids` (B,) at `positions` (B,) -> logits (B, vocab); each token's
        keys and values are written into `cache` (phextcc.qwen3.new_cache) in place."""
        ids = np.ascontiguousarray(np.reshape(ids, (-1, 1)), dtype=np.int64)
        positions = np.ascontiguousarray(np.reshape(positions, (-1, 1)), dtype=np.int64)
        if not self.decode or ids.shape != positions.shape:
            raise ValueError(f"step: a decode graph, one position per id; got {ids.shape[0]} "
                             f"ids and {positions.shape[0]} positions")  # fmt: skip
        first = cache.get("cache.0")
        if first is None or first.ndim != 5:
            raise ValueError("step: cache must hold cache.0 .. cache.N (2, B, kv_heads, T, d)")
        feeds = {"ids": ids, "positions": positions}
        feeds.update({self._cache_names.get(k, k): v for k, v in cache.items()})
        (logits,) = self.run(feeds, ids.shape[0], first.shape[3]).outputs.values()
        return logits


@dataclass(frozen=True)
class Paged:
    """The node's KV arena a paged decoder program binds: its shape (frames, layers, 2,
    kv_heads, page_tokens * head_dim) and the page-table columns per sequence."""

    kv_shape: tuple[int, ...]
    max_pages: int


def lower_decoder(
    graph: Graph,
    bsz: int,
    tokens: int,
    names: dict,
    resident: dict[str, np.ndarray],
    *,
    paged: Paged | None = None,
    with_logits: bool = True,
) -> tuple[Program, str | None]:
    """A decoder graph as one SIW program for `bsz` sequences of `tokens` (the prompt length of
    a prefill, the cache length of a decode; paged: the tokens of this step); returns it and
    its logits tensor's name. Values get dense (rows, last axis) buffers reused by liveness,
    written in place where the IR planned it; 3-D ops read (B, S, width) views of them.

    Paged (DecoderModule's docstring): qk_norm_rope + kv_append become D.kv_store_paged,
    attention and cached_attention D.paged_attn; a prefill (bsz 1) normalises and projects
    its last position only, as the hand-written forward does, and none with_logits=False."""
    b = _Builder()
    decode = any(op.kind == "kv_append" for op in graph.ops)
    seq = tokens if paged else 1 if decode else tokens
    if paged and not decode and bsz != 1:
        raise CompileError(f"a paged prefill runs one sequence at a time, not {bsz}")

    def dims(shape) -> tuple[int, ...]:
        sizes = {"B": bsz, "S": seq, "T": 1 if paged else tokens}
        return tuple(sizes.get(d, d) if isinstance(d, str) else int(d) for d in shape)

    for sname, array in resident.items():
        b.tensor(sname, _SIW_DTYPE[array.dtype], array.shape, "resident")
    feeds: dict[str, str | None] = {}
    for name in graph.inputs:
        v = graph.values[name]
        if paged and name != "ids":
            feeds[name] = None  # positions and dense caches: the page table says it all
            continue
        init = "inout" if name.startswith("cache.") else "input"
        feeds[name] = b.tensor(name, v.dtype, dims(v.shape), init)
    kv = rope = pages = ""
    tail: tuple = ()
    if paged:
        d = next(op.attrs["head_dim"] for op in graph.ops if op.kind == "qk_norm_rope")
        kv = b.tensor("kv", "f32", paged.kv_shape, "inout")
        rope = b.tensor("rope", "f32", (2, bsz * seq, d), "input")
        pages = b.tensor("pages", "i64", (bsz, 1 + paged.max_pages), "input")
    layer = -1
    last_use: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            last_use[name] = i
    (logits,) = (o for o in graph.outputs if not o.endswith(".cache"))
    head = graph.producer(logits)
    if paged and not decode:  # the final norm and the lm_head: the last position only
        tail = (graph.producer(head.inputs[0]), head)
    buffer_of: dict[str, str] = {}
    holders: dict[str, set[str]] = {}  # buffer -> live values it holds
    free: dict[tuple[int, ...], list[str]] = {}
    count = [0]

    def operand(name: str) -> str | None:
        if name in buffer_of:
            return buffer_of[name]
        if name in feeds:
            return feeds[name]
        raise CompileError(f"{name} is read before any op produces it")

    def weight(name: str) -> tuple[str, str | None]:
        parts = names[name]
        return parts[0], parts[1] if len(parts) > 1 else None

    def new_buffer(value: str, shape: tuple[int, ...]) -> str:
        pool = free.get(shape)
        if pool and value != logits:
            buf = pool.pop()
        elif value == logits:
            buf = b.tensor("logits", "f32", shape, "zeros", output=True)
        else:
            buf = b.tensor(f"act{count[0]}", "f32", shape, "zeros")
            count[0] += 1
        return buf

    def hold(value: str, buf: str) -> None:
        buffer_of[value] = buf
        holders.setdefault(buf, set()).add(value)

    def grid(name: str, width: int) -> str:  # a (B, S, width) view of a value's buffer
        return b.view(name, (bsz, seq, width))

    rows = bsz * seq
    for i, op in enumerate(graph.ops):
        kind, attrs = op.kind, op.attrs
        if op in tail and not with_logits:
            continue  # a prefill chunk before the last: its KV is what counts
        width = dims(graph.shape(op.output))[-1]
        src = [operand(n) if n not in graph.weights else None for n in op.inputs]
        first = op.inputs[0] if op.inputs else None
        in_place = attrs.get("in_place") and first in buffer_of
        heads = attrs.get("heads", 0)
        if op in tail:
            if kind == "linear":  # the lm_head over the last position only
                w, scale = weight(op.inputs[1])
                dst = new_buffer(op.output, (1, width))
                b.d(DOp.MATMUL, dst, src[0], w, scale)
            else:  # x += the last layer's output; the final norm of the last position
                total = buffer_of[first] if in_place else new_buffer("", (rows, width))
                b.d(DOp.ADD, total, src[0], src[1])
                dst = new_buffer(op.output, (1, width))
                last = b.view(total, (1, width), (rows - 1) * width)
                b.d(DOp.RMSNORM, dst, last, names[op.inputs[2]][0], imm=attrs["eps"])
                for extra in op.extra:
                    hold(extra, total)
        elif paged and kind == "qk_norm_rope":
            if not in_place:
                raise CompileError(f"{op.text()}: lowers in place only (run plan_in_place)")
            layer += 1
            dst = buffer_of[first]
            b.d(DOp.KV_STORE_PAGED, kv, grid(dst, width), names[op.output][0], rope, pages,
                flags=layer, imm=attrs["eps"])  # fmt: skip
        elif paged and kind == "kv_append":
            dst = kv  # written by kv_store_paged
        elif paged and kind in ("attention", "cached_attention"):
            dst = new_buffer(op.output, (rows, width))
            qkv_width = b.tensors[b.ids[src[0]]].shape[-1]
            b.d(DOp.PAGED_ATTN, grid(dst, width), grid(src[0], qkv_width), kv, pages,
                flags=layer)  # fmt: skip
        elif kind == "gather":
            table, scale = weight(op.inputs[0])
            dst = new_buffer(op.output, (rows, width))
            b.d(DOp.ROWS, dst, table, b.view(src[1], (rows,)), scale)
        elif kind == "rms_norm":
            dst = buffer_of[first] if in_place else new_buffer(op.output, (rows, width))
            b.d(DOp.RMSNORM, dst, src[0], names[op.inputs[1]][0], imm=attrs["eps"])
        elif kind == "linear":
            if "precision" not in attrs or len(op.inputs) > 2 or attrs.get("act"):
                raise CompileError(f"{op.text()}: only packed linears without bias lower")
            w, scale = weight(op.inputs[1])
            dst = new_buffer(op.output, (rows, width))
            b.d(DOp.MATMUL, dst, src[0], w, scale)
        elif kind == "qk_norm_rope":
            if not in_place:
                raise CompileError(f"{op.text()}: lowers in place only (run plan_in_place)")
            dst = buffer_of[first]
            rope = names[f"rope_{attrs['head_dim']}_{attrs['theta']:g}"][0]
            b.d(DOp.QK_NORM_ROPE, grid(dst, width), names[op.output][0], rope, src[3],
                flags=heads, imm=attrs["eps"])  # fmt: skip
        elif kind == "attention":
            if not (attrs.get("packed") and attrs.get("causal") and "kv_heads" in attrs):
                raise CompileError(f"{op.text()}: only packed causal GQA attention lowers")
            dst = new_buffer(op.output, (rows, width))
            qkv_width = b.tensors[b.ids[src[0]]].shape[-1]
            b.d(DOp.ATTN_GQA, grid(dst, width), grid(src[0], qkv_width), flags=heads)
        elif kind == "add_rms_norm":
            gamma = names[op.inputs[2]][0]
            dst = new_buffer(op.output, (rows, width))
            if in_place:
                total = buffer_of[first]
                b.d(DOp.ADD_RMSNORM, dst, total, src[1], gamma, imm=attrs["eps"])
            else:  # the sum in a buffer of its own, as phextcc.run adds then normalises
                total = new_buffer(op.extra[0] if op.extra else "", (rows, width))
                b.d(DOp.ADD, total, src[0], src[1])
                b.d(DOp.RMSNORM, dst, total, gamma, imm=attrs["eps"])
            for extra in op.extra:
                hold(extra, total)
        elif kind == "swiglu":
            dst = new_buffer(op.output, (rows, width))
            b.d(DOp.SWIGLU, dst, src[0])
        elif kind == "kv_append":
            dst = src[0]  # the cache itself, written in place
            qkv_width = b.tensors[b.ids[src[1]]].shape[-1]
            b.d(DOp.KV_APPEND, dst, grid(src[1], qkv_width), src[2], flags=heads)
        elif kind == "cached_attention":
            dst = new_buffer(op.output, (rows, width))
            qkv_width = b.tensors[b.ids[src[0]]].shape[-1]
            b.d(DOp.CACHED_ATTN, grid(dst, width), grid(src[0], qkv_width), src[1], src[2],
                flags=heads)  # fmt: skip
        else:
            raise CompileError(f"{op.text()}: no SIW lowering for {kind!r}")
        hold(op.output, dst)
        for name in {*op.inputs, *op.results}:
            buf = buffer_of.get(name)
            if buf is None or (last_use.get(name, -1) > i) or name in graph.outputs:
                continue
            live = holders[buf]
            live.discard(name)
            if not live and buf not in feeds.values() and buf != kv:
                free.setdefault(b.tensors[b.ids[buf]].shape, []).append(buf)
    program = Program(b.tensors)
    program.words = pack_words(program, b.slots)
    return program, buffer_of.get(logits)
