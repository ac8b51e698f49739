"""phextcc, the model compiler: model graph -> IR -> passes -> SIW words on the sentron.

A frontend (`phextcc.bert`, `phextcc.qwen3`) reads a model's architecture and weights into a
small IR:
a `Graph` of `Op`s over named `Value`s, in program order, with symbolic batch (`B`) and sequence
(`S`) axes. Passes rewrite it — shape inference, constant folding of the embedding tables, QKV
fusion, bias + GELU fusion, residual + layer-norm fusion, weight pre-packing, dead-value removal,
in-place planning —
and `vtpu compile MODEL` prints the IR after each one. For the Qwen3 decoder (a graph with a
`precision`) the same passes also fuse the q/k/v projections across GQA widths together with the
per-head q/k RMSNorm and rotary embeddings (`qk_norm_rope`), gate and up into one linear and a
`swiglu`, each residual add with the RMSNorm after it (`add_rms_norm`, two results: the normalised
row and the residual stream), and pack every Linear weight and the embedding table in the graph's
precision with vtpu.kernels.packed. A BERT loaded in a reduced precision (bf16, int8,
int8-dynamic) brings its Linear weights packed for their kernels already (sentron.LINEAR_WEIGHTS:
`weight_shape` reads them as (K, N)); the passes keep them as they are, and both `run` and the
SIW program's D.linear call the kernel each is packed for. `run` interprets a compiled graph
against its resident weights, one kernel call per op (the reference); `phextcc.lower` lowers it
to SIW programs the sentron runs (`vtpu compile MODEL --siw`).

The decoder's prefill and decode graphs lower to SIW too (`phextcc.lower.DecoderModule`), over
dense caches or the node's paged KV cache (Qwen3Model.compile). The decoder's numpy routines
(silu, qk_norm_rope, kv_append, cached_attention, gqa_attention) live in vtpu.kernels.decoder.
Not yet: tiling and prefetch passes (docs/architecture.md, "Not yet": what they could win,
measured).
Ops are kernel-level, weights are named constants, shapes are symbolic; an op has one result
(`output`) and, for `add_rms_norm`, a second one in `extra`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The decoder's routines live with the kernels: phextcc.run and the sentron share them.
from vtpu.kernels.decoder import (
    cached_attention,
    gqa_attention,
    kv_append,
    qk_norm_rope,
    silu,
)
from vtpu.kernels.decoder import head_widths as _head_widths
from vtpu.kernels.decoder import rope as _rope
from vtpu.sentron import LINEAR_WEIGHTS, linear_weight_shape, packed_linear_dtype

Dim = int | str  # a size, or "B" / "S" bound at run time


class CompileError(ValueError):
    """A graph a pass cannot accept; the message names the op and value."""


@dataclass
class Value:
    name: str
    shape: tuple[Dim, ...] | None = None  # None until infer_shapes
    dtype: str = "f32"


@dataclass
class Op:
    kind: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)  # further results (add_rms_norm's sum)

    @property
    def results(self) -> list[str]:
        return [self.output, *self.extra]

    def text(self) -> str:
        attrs = "".join(f" {k}={_attr_text(v)}" for k, v in self.attrs.items())
        return f"{', '.join(self.results)} = {self.kind}({', '.join(self.inputs)}){attrs}"


def _attr_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Graph:
    name: str
    inputs: list[str]
    outputs: list[str]
    ops: list[Op]
    weights: dict[str, Any]  # resident constants by name: arrays, or packed.PackedWeight
    values: dict[str, Value] = field(default_factory=dict)
    # None: BERT's float32 (K, N) GEMM layout. "fp32" / "bf16" / "int8": pack_weights packs the
    # Linear weights and gathered tables with vtpu.kernels.packed in this precision.
    precision: str | None = None

    def shape(self, name: str) -> tuple[Dim, ...]:
        if name in self.weights:
            return weight_shape(self.weights[name])
        value = self.values.get(name)
        if value is None or value.shape is None:
            raise CompileError(f"{name} has no shape yet: run infer_shapes first")
        return value.shape

    def consumers(self, name: str) -> list[Op]:
        return [op for op in self.ops if name in op.inputs]

    def producer(self, name: str) -> Op | None:
        return next((op for op in self.ops if name in op.results), None)

    def text(self) -> str:
        """The IR as a person reads it: inputs, weights with their shapes and bytes, then ops."""
        lines = [f"graph {self.name}"]
        for name in self.inputs:
            v = self.values[name]
            lines.append(f"  input  {name}: {v.dtype}{_shape_text(v.shape)}")
        total = sum(w.nbytes for w in self.weights.values())
        packing = f" (linear weights: {self.precision})" if self.precision else ""
        lines.append(f"  weights: {len(self.weights)} tensors, {total} bytes{packing}")
        for op in self.ops:
            shape = self.values.get(op.output)  # add_rms_norm's sum has the same shape
            note = f"  : {_shape_text(shape.shape)}" if shape and shape.shape else ""
            lines.append(f"  {op.text()}{note}")
        lines.append(f"  return {', '.join(self.outputs)}")
        return "\n".join(lines)


def weight_shape(weight: Any) -> tuple[int, ...]:
    """A weight's shape as the IR reads it; a Linear weight a reduced-precision encoder keeps
    packed for its kernel (sentron.LINEAR_WEIGHTS) is the (K, N) its linear reads."""
    if packed_linear_dtype(weight) is not None:
        return linear_weight_shape(weight)
    return tuple(weight.shape)


def _shape_text(shape: tuple[Dim, ...] | None) -> str:
    return "[?]" if shape is None else "[" + ",".join(str(d) for d in shape) + "]"


# ---- passes ----------------------------------------------------------------------------------


def infer_shapes(graph: Graph) -> Graph:
    """Every value's shape from its op's rule; an inconsistent graph is a CompileError."""
    for op in graph.ops:
        shapes = [graph.shape(name) for name in op.inputs]
        rule = _SHAPE_RULES.get(op.kind)
        if rule is None:
            raise CompileError(f"{op.text()}: no op {op.kind!r}")
        try:
            out = rule(shapes, op.attrs)
        except (IndexError, KeyError, ValueError) as exc:
            shapes_text = ", ".join(_shape_text(s) for s in shapes)
            raise CompileError(f"{op.text()}: operand shapes {shapes_text}: {exc}") from None
        for name in op.results:
            graph.values.setdefault(name, Value(name)).shape = out
    return graph


def _same(a: tuple, b: tuple, what: str) -> None:
    if a != b:
        raise ValueError(f"{what}: {_shape_text(a)} != {_shape_text(b)}")


def _linear_shape(s: list, attrs: dict) -> tuple:
    x, w = s[0], s[1]
    # (N, K) as PyTorch stores it (trans_w) or as packed.PackedWeight keeps it (precision)
    n, k = (w[0], w[1]) if attrs.get("trans_w") or attrs.get("precision") else (w[1], w[0])
    _same((x[-1],), (k,), "x features vs weight K")
    if len(s) > 2:
        _same(s[2], (n,), "bias")
    return (*x[:-1], n)


def _norm_shape(s: list, attrs: dict) -> tuple:
    for g in s[-2:]:
        _same(g, (s[0][-1],), "gamma/beta")
    if len(s) == 4:
        _same(s[0], s[1], "residual")
    return s[0]


def _attention_shape(s: list, attrs: dict) -> tuple:
    heads = attrs["heads"]
    if "kv_heads" in attrs:  # grouped-query: q, k, v widths from the head counts and head_dim
        return _gqa_attention_shape(s, attrs)
    if attrs.get("packed"):  # one (B, S, 3H) input: q, k, v side by side
        width = s[0][-1]
        if width % 3 or (width // 3) % heads:
            raise ValueError(f"packed width {width} is not 3 x a multiple of {heads} heads")
        return (*s[0][:-1], width // 3)
    _same(s[0], s[1], "q vs k")
    _same(s[0], s[2], "q vs v")
    if s[0][-1] % heads:
        raise ValueError(f"width {s[0][-1]} is not a multiple of {heads} heads")
    return s[0]


def _gqa_attention_shape(s: list, attrs: dict) -> tuple:
    q_w, kv_w = _head_widths(attrs)
    if attrs.get("packed"):  # one (B, S, q + 2 kv) input: q heads, then k heads, then v heads
        _same(s[0][-1:], (q_w + 2 * kv_w,), "packed q/k/v width")
    else:
        _same(s[0][-1:], (q_w,), "q width")
        _same(s[1], (*s[0][:-1], kv_w), "k")
        _same(s[2], (*s[0][:-1], kv_w), "v")
    return (*s[0][:-1], q_w)


def _rms_norm_shape(s: list, attrs: dict) -> tuple:
    _same(s[-1], (s[0][-1],), "gamma")
    if len(s) == 3:  # add_rms_norm(a, b, gamma)
        _same(s[0], s[1], "residual")
    return s[0]


def _head_norm_shape(s: list, attrs: dict) -> tuple:
    """head_rms_norm(x, gamma): x (..., heads * head_dim), one gamma (head_dim,) for every head."""
    _same(s[0][-1:], (attrs["heads"] * attrs["head_dim"],), "heads x head_dim")
    _same(s[1], (attrs["head_dim"],), "gamma")
    return s[0]


def _rope_shape(s: list, attrs: dict) -> tuple:
    _same(s[0][-1:], (attrs["heads"] * attrs["head_dim"],), "heads x head_dim")
    _same(s[1], s[0][:-1], "positions")
    return s[0]


def _qk_norm_rope_shape(s: list, attrs: dict) -> tuple:
    q_w, kv_w = _head_widths(attrs)
    _same(s[0][-1:], (q_w + 2 * kv_w,), "packed q/k/v width")
    _same(s[1], (attrs["head_dim"],), "q gamma")
    _same(s[2], (attrs["head_dim"],), "k gamma")
    _same(s[3], s[0][:-1], "positions")
    return s[0]


def _cache_check(cache: tuple, attrs: dict) -> None:
    # (2, B, kv_heads, T, head_dim): keys then values, T positions per sequence
    if len(cache) != 5 or cache[0] != 2:
        raise ValueError(f"cache {_shape_text(cache)} is not (2, B, kv_heads, T, head_dim)")
    _same((cache[2], cache[4]), (attrs["kv_heads"], attrs["head_dim"]), "cache kv_heads, head_dim")


def _kv_append_shape(s: list, attrs: dict) -> tuple:
    _cache_check(s[0], attrs)
    q_w, kv_w = _head_widths(attrs)
    if attrs.get("packed"):  # kv_append(cache, qkv, positions)
        _same(s[1][-1:], (q_w + 2 * kv_w,), "packed q/k/v width")
    else:  # kv_append(cache, k, v, positions)
        _same(s[1][-1:], (kv_w,), "k width")
        _same(s[2], s[1], "v")
    _same(s[-1], s[1][:-1], "positions")
    return s[0]


def _cached_attention_shape(s: list, attrs: dict) -> tuple:
    q_w, kv_w = _head_widths(attrs)
    _cache_check(s[1], attrs)
    _same(s[0][-1:], ((q_w + 2 * kv_w) if attrs.get("packed") else q_w,), "q width")
    _same(s[2], s[0][:-1], "positions")
    return (*s[0][:-1], q_w)


def _swiglu_shape(s: list, attrs: dict) -> tuple:
    if s[0][-1] % 2:
        raise ValueError(f"width {s[0][-1]} is not gate + up of one size")
    return (*s[0][:-1], s[0][-1] // 2)


_SHAPE_RULES: dict[str, Callable[[list, dict], tuple]] = {
    "gather": lambda s, a: (*s[1], s[0][1]),
    "add_row": lambda s, a: (_same((s[0][-1],), s[1][-1:], "row"), s[0])[1],
    "add_positions": lambda s, a: (_same((s[0][-1],), s[1][-1:], "table width"), s[0])[1],
    "add": lambda s, a: (_same(s[0], s[1], "operands"), s[0])[1],
    "layer_norm": _norm_shape,
    "add_layer_norm": _norm_shape,
    "linear": _linear_shape,
    "gelu": lambda s, a: s[0],
    "attention": _attention_shape,
    "mean_pool": lambda s, a: (s[0][0], s[0][2]),
    "l2_normalize": lambda s, a: s[0],
    "rms_norm": _rms_norm_shape,
    "add_rms_norm": _rms_norm_shape,
    "head_rms_norm": _head_norm_shape,
    "rope": _rope_shape,
    "qk_norm_rope": _qk_norm_rope_shape,
    "silu": lambda s, a: s[0],
    "mul": lambda s, a: (_same(s[0], s[1], "operands"), s[0])[1],
    "swiglu": _swiglu_shape,
    "kv_append": _kv_append_shape,
    "cached_attention": _cached_attention_shape,
}


def fold_embedding_tables(graph: Graph) -> Graph:
    """add_row(x, type_row) then add_positions(., pos) -> add_positions(x, pos + type_row): two
    constant tables become one, an add per element saved per token."""
    for op in list(graph.ops):
        if op.kind != "add_row" or op.inputs[1] not in graph.weights:
            continue
        users = graph.consumers(op.output)
        if len(users) != 1 or users[0].kind != "add_positions":
            continue
        pos_op = users[0]
        if pos_op.inputs[1] not in graph.weights:
            continue
        folded = f"{pos_op.inputs[1]}+{op.inputs[1]}"
        graph.weights[folded] = graph.weights[pos_op.inputs[1]] + graph.weights[op.inputs[1]]
        pos_op.inputs = [op.inputs[0], folded]
        graph.ops.remove(op)
    return graph


def fuse_qkv(graph: Graph) -> Graph:
    """The three projections an attention reads from one input become one linear over
    concatenated weights (one GEMM instead of three), and the attention reads it packed.

    With or without bias, for any ratio of query to key/value heads. Where q and k each pass a
    per-head RMSNorm and then rotary embeddings between projection and attention (Qwen3), those
    four ops become one `qk_norm_rope` over the packed projection (in place: no split, no
    merge); with a KV cache (the decode graph), `kv_append` and `cached_attention` read the
    packed projection too."""
    for att in [op for op in graph.ops
                if op.kind in ("attention", "cached_attention") and not op.attrs.get("packed")]:  # fmt: skip
        append = None
        if att.kind == "attention":
            names = att.inputs[:3]
        else:  # cached_attention(q, cache, positions) reads the cache kv_append(cache, k, v) wrote
            append = graph.producer(att.inputs[1])
            if append is None or append.kind != "kv_append" or append.attrs.get("packed"):
                continue
            names = [att.inputs[0], *append.inputs[1:3]]
        chains = [_head_chain(graph, name) for name in names]
        producers = [graph.producer(chain[0].inputs[0] if chain else name)
                     for chain, name in zip(chains, names, strict=True)]  # fmt: skip
        if not _fusable_projections(graph, producers):
            continue
        kinds = [[op.kind for op in chain] for chain in chains]
        if kinds == [["head_rms_norm", "rope"]] * 2 + [[]]:
            (q_norm, q_rope), (k_norm, k_rope) = chains[:2]
            if q_norm.attrs["eps"] != k_norm.attrs["eps"] or q_rope.inputs[1] != k_rope.inputs[1]:
                continue
            if q_rope.attrs["theta"] != k_rope.attrs["theta"]:
                continue
        elif kinds != [[], [], []]:
            continue
        trans = bool(producers[0].attrs.get("trans_w"))
        base = att.output
        graph.weights[f"{base}.wqkv"] = _concat(
            [graph.weights[p.inputs[1]] for p in producers], axis=0 if trans else 1
        )
        inputs = [producers[0].inputs[0], f"{base}.wqkv"]
        if len(producers[0].inputs) == 3:
            graph.weights[f"{base}.bqkv"] = np.concatenate(
                [graph.weights[p.inputs[2]] for p in producers]
            )
            inputs.append(f"{base}.bqkv")
        fused = Op("linear", inputs, f"{base}.qkv", {"trans_w": True} if trans else {})
        graph.ops[graph.ops.index(producers[0])] = fused
        for p in producers[1:]:
            graph.ops.remove(p)
        packed = fused.output
        if chains[0]:
            (q_norm, q_rope), (k_norm, k_rope) = chains[:2]
            heads = {k: att.attrs[k] for k in ("heads", "kv_heads", "head_dim")}
            rotated = Op(
                "qk_norm_rope",
                [packed, q_norm.inputs[1], k_norm.inputs[1], q_rope.inputs[1]],
                f"{base}.qkv_rope",
                {**heads, "eps": q_norm.attrs["eps"], "theta": q_rope.attrs["theta"]},
            )
            graph.ops.insert(graph.ops.index(fused) + 1, rotated)
            for op in chains[0] + chains[1]:
                graph.ops.remove(op)
            packed = rotated.output
        if append is not None:
            append.inputs = [append.inputs[0], packed, append.inputs[3]]
            append.attrs["packed"] = True
            att.inputs = [packed, *att.inputs[1:]]
        else:
            att.inputs = [packed, *att.inputs[3:]]
        att.attrs["packed"] = True
    return graph


def _concat(weights: list[Any], axis: int) -> Any:
    """Weights side by side; a checkpoint mixing raw bf16 bits and float32 is widened first.
    Packed weights are joined row-wise as they are (bits and scales exact), without a copy
    where they are adjacent rows of one buffer (a loaded model's fused weights, sliced)."""
    from vtpu.kernels import packed

    if isinstance(weights[0], packed.PackedWeight):
        data = _adjacent_rows([w.data for w in weights])
        scale = None if weights[0].scale is None else _adjacent_rows([w.scale for w in weights])
        return packed.PackedWeight((data.shape[0], data.shape[1]), weights[0].precision, data,
                                   scale)  # fmt: skip
    if len({w.dtype for w in weights}) > 1:
        weights = [_widen(w) for w in weights]
    return np.concatenate(weights, axis=axis)


def _adjacent_rows(parts: list[np.ndarray]) -> np.ndarray:
    """The rows of `parts` as one array: a view when they are consecutive rows of one buffer."""
    first = parts[0]
    at = first.__array_interface__["data"][0]
    for part in parts:
        if (
            _root(part) is not _root(first)
            or not part.flags.c_contiguous
            or part.__array_interface__["data"][0] != at
        ):
            return np.concatenate(parts)
        at += part.nbytes
    rows = sum(part.shape[0] for part in parts)
    return np.lib.stride_tricks.as_strided(first, (rows, *first.shape[1:]), writeable=False)


def root_array(array: np.ndarray) -> np.ndarray:
    """The outermost numpy array a view's memory belongs to."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _root(array: np.ndarray) -> object:
    """The object that owns an array's memory (an array, or the buffer it was made from)."""
    root = root_array(array)
    return root if root.base is None else root.base


def _head_chain(graph: Graph, name: str) -> list[Op]:
    """The per-head ops (head_rms_norm, rope) between a projection and `name`, in program
    order, each the only reader of what it reads."""
    chain: list[Op] = []
    op = graph.producer(name)
    while op is not None and op.kind in ("head_rms_norm", "rope"):
        if len(graph.consumers(op.inputs[0])) != 1:
            return [op]  # not fusable: the caller sees a chain it does not accept
        chain.insert(0, op)
        op = graph.producer(op.inputs[0])
    return chain


def _fusable_projections(graph: Graph, producers: list[Op | None]) -> bool:
    """Linears of one input, all with a bias or none, one layout, each read only once."""
    if not all(p and p.kind == "linear" and not p.attrs.get("act") for p in producers):
        return False
    if len({p.inputs[0] for p in producers}) != 1 or len({len(p.inputs) for p in producers}) != 1:
        return False
    if len({bool(p.attrs.get("trans_w")) for p in producers}) != 1:
        return False
    from vtpu.kernels import packed

    kinds = {type(graph.weights.get(p.inputs[1])) for p in producers}
    if kinds == {packed.PackedWeight}:  # a loaded model's weights: one precision, (N, K) rows
        precisions = {graph.weights[p.inputs[1]].precision for p in producers}
        if len(precisions) != 1 or not producers[0].attrs.get("trans_w"):
            return False
    elif kinds != {np.ndarray}:
        return False
    return all(len(graph.consumers(p.output)) == 1 for p in producers)


def fuse_gate_up(graph: Graph) -> Graph:
    """mul(silu(linear(x, W_gate)), linear(x, W_up)) -> swiglu(linear(x, [W_gate; W_up])): one
    GEMM for both projections, and the activation and product in one pass over its output."""
    for op in [o for o in graph.ops if o.kind == "mul"]:
        a, b = (graph.producer(name) for name in op.inputs)
        if b is not None and b.kind == "silu":
            a, b = b, a
        if a is None or a.kind != "silu" or len(graph.consumers(a.output)) != 1:
            continue
        gate = graph.producer(a.inputs[0])
        if not _fusable_projections(graph, [gate, b]) or len(gate.inputs) != 2:
            continue
        trans = bool(gate.attrs.get("trans_w"))
        weight = f"{op.output}.wgu"
        graph.weights[weight] = _concat(
            [graph.weights[gate.inputs[1]], graph.weights[b.inputs[1]]], axis=0 if trans else 1
        )
        fused = Op("linear", [gate.inputs[0], weight], f"{op.output}.gu",
                   {"trans_w": True} if trans else {})  # fmt: skip
        graph.ops[graph.ops.index(gate)] = fused
        graph.ops[graph.ops.index(op)] = Op("swiglu", [fused.output], op.output)
        graph.ops.remove(a)
        graph.ops.remove(b)
    return graph


def fuse_bias_activation(graph: Graph) -> Graph:
    """linear then gelu on its only consumer -> one linear with act=gelu (the activation runs in
    the pass that adds the bias, while the row is in cache)."""
    for op in [o for o in graph.ops if o.kind == "gelu"]:
        src = _producer(graph, op.inputs[0])
        if src is None or src.kind != "linear" or src.attrs.get("act"):
            continue
        if len(graph.consumers(src.output)) != 1:
            continue
        src.attrs["act"] = "gelu"
        _rename(graph, op.output, src.output)
        graph.ops.remove(op)
    return graph


def fuse_residual_norm(graph: Graph) -> Graph:
    """add(a, b) then layer_norm on its only consumer -> add_layer_norm(a, b): the residual
    stream is read once and the sum never written back on its own.

    add(a, b) then rms_norm -> add_rms_norm(a, b) (pre-norm decoders): there the sum is the
    residual stream the next add reads, so the fused op has it as a second result, written
    in the same pass that normalises it."""
    for op in [o for o in graph.ops if o.kind in ("layer_norm", "rms_norm")]:
        src = _producer(graph, op.inputs[0])
        if src is None or src.kind != "add":
            continue
        others = [c for c in graph.consumers(src.output) if c is not op]
        if op.kind == "layer_norm":
            if others:
                continue
            fused = Op("add_layer_norm", [*src.inputs, *op.inputs[1:]], op.output, dict(op.attrs))
        else:
            at = graph.ops.index(op)
            if any(graph.ops.index(c) < at for c in others) or src.output in graph.outputs:
                continue  # the sum is read before the norm (or returned): keep them apart
            extra = [src.output] if others else []
            fused = Op("add_rms_norm", [*src.inputs, op.inputs[1]], op.output, dict(op.attrs),
                       extra)  # fmt: skip
        graph.ops[graph.ops.index(op)] = fused
        graph.ops.remove(src)
    return graph


def pack_weights(graph: Graph) -> Graph:
    """Linear weights stored (N, K) as PyTorch keeps them are transposed once to the (K, N)
    layout the GEMM reads directly; every constant becomes C-contiguous float32.

    A graph with a precision (the decoder) instead packs every Linear weight and every gathered
    table with vtpu.kernels.packed.pack, (N, K) rows in fp32, bf16 or int8 (per output channel):
    one packed table serves both the embedding gather and a tied lm_head.

    A reduced-precision encoder's Linear weights come packed for their kernels already
    (sentron.LINEAR_WEIGHTS): they stay as they are."""
    if graph.precision is not None:
        return _pack_precision(graph)
    for op in graph.ops:
        if op.kind == "linear" and op.attrs.pop("trans_w", False):
            name = op.inputs[1]
            if len(graph.consumers(name)) != 1:
                raise CompileError(f"{op.text()}: weight {name} is shared; pack a copy per use")
            graph.weights[name] = graph.weights[name].T
    for name, w in graph.weights.items():
        if packed_linear_dtype(w) is None:
            graph.weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    return graph


def _pack_precision(graph: Graph) -> Graph:
    from vtpu.kernels import KernelInputError, packed

    layout: dict[str, bool] = {}  # weight -> stored (N, K)
    for op in graph.ops:
        if op.kind == "linear" and "precision" not in op.attrs:
            rows = bool(op.attrs.pop("trans_w", False))
            if layout.setdefault(op.inputs[1], rows) != rows:
                raise CompileError(f"{op.text()}: weight {op.inputs[1]} is read in two layouts")
            op.attrs["precision"] = graph.precision
        elif op.kind == "gather" and layout.setdefault(op.inputs[0], True) is not True:
            raise CompileError(f"{op.text()}: table {op.inputs[0]} is also a (K, N) weight")
    for name, w in graph.weights.items():
        if isinstance(w, packed.PackedWeight):  # a loaded model's: (N, K) rows already
            if w.precision != graph.precision or layout.get(name) is False:
                raise CompileError(f"weight {name} is packed {w.shape} in {w.precision}; the "
                                   f"graph reads it in {graph.precision}")  # fmt: skip
        elif name in layout:
            try:
                graph.weights[name] = packed.pack(w if layout[name] else w.T, graph.precision)
            except KernelInputError as exc:
                raise CompileError(f"weight {name}: {exc}") from None
        else:
            graph.weights[name] = np.ascontiguousarray(_widen(w))
    return graph


def _widen(w: np.ndarray) -> np.ndarray:
    """float32 from float32, raw bf16 bits (uint16, as safetensors stores bf16) or float16."""
    if w.dtype == np.uint16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    return w.astype(np.float32, copy=False)


def drop_dead(graph: Graph) -> Graph:
    """Weights and values no op reads any more (the tables folded, the unfused projections)."""
    used = {name for op in graph.ops for name in op.inputs} | set(graph.outputs)
    graph.weights = {k: v for k, v in graph.weights.items() if k in used}
    produced = {name for op in graph.ops for name in op.results} | set(graph.inputs)
    graph.values = {k: v for k, v in graph.values.items() if k in produced}
    return graph


def plan_in_place(graph: Graph) -> Graph:
    """Row-wise ops whose first operand dies with them write over it (attr in_place): no new
    buffer, no fresh pages to fault in, for every residual norm of every layer."""
    last_use: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            last_use[name] = i
    for i, op in enumerate(graph.ops):
        first = op.inputs[0] if op.inputs else None
        if (
            op.kind in _IN_PLACE_KINDS
            and first not in graph.weights
            and first not in graph.inputs
            and first not in graph.outputs
            and last_use.get(first) == i
            and op.inputs.count(first) == 1
        ):
            op.attrs["in_place"] = True
    return graph


# add_rms_norm in place writes the residual sum over its first operand; qk_norm_rope
# normalises and rotates the packed projection where it lies.
_IN_PLACE_KINDS = {"add_layer_norm", "layer_norm", "l2_normalize", "rms_norm", "add_rms_norm",
                   "qk_norm_rope"}  # fmt: skip


PASSES: list[tuple[str, Callable[[Graph], Graph]]] = [
    ("infer_shapes", infer_shapes),
    ("fold_embedding_tables", fold_embedding_tables),
    ("fuse_qkv", fuse_qkv),
    ("fuse_gate_up", fuse_gate_up),
    ("fuse_bias_activation", fuse_bias_activation),
    ("fuse_residual_norm", fuse_residual_norm),
    ("pack_weights", pack_weights),
    ("drop_dead", drop_dead),
    ("plan_in_place", plan_in_place),
    ("infer_shapes (check)", infer_shapes),
]


def compile_graph(graph: Graph, on_pass: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run every pass in order; on_pass(name, graph) sees the IR after each (for dumps)."""
    if on_pass:
        on_pass("frontend", graph)
    for name, fn in PASSES:
        graph = fn(graph)
        if on_pass:
            on_pass(name, graph)
    return graph


def _producer(graph: Graph, name: str) -> Op | None:
    return graph.producer(name)


def _rename(graph: Graph, old: str, new: str) -> None:
    for op in graph.ops:
        op.inputs = [new if n == old else n for n in op.inputs]
    graph.outputs = [new if n == old else n for n in graph.outputs]


def count_ops(graph: Graph, lengths: np.ndarray, seq: int) -> int:
    """The ops one run retires for a batch of len(lengths) sequences padded to `seq`, from the
    one op-count table (vtpu.ops) the kernels count with, so it equals what they add up.
    Encoder (BERT) graphs only: the decoder's ops (rms_norm, swiglu, ...) are not counted yet."""
    from vtpu import ops

    bsz = len(lengths)

    def size(name: str) -> int:
        return math.prod(bsz if d == "B" else seq if d == "S" else d for d in graph.shape(name))

    total = 0
    for op in graph.ops:
        elements = size(op.output)
        if op.kind in ("add_row", "add_positions", "add"):
            total += ops.PER_ELEMENT["add"] * elements
        elif op.kind in ("layer_norm", "add_layer_norm", "l2_normalize"):
            total += ops.PER_ELEMENT[op.kind] * elements
        elif op.kind == "linear":
            n = graph.shape(op.output)[-1]
            k = graph.shape(op.inputs[0])[-1]
            total += ops.linear(elements // n, n, k, bias=len(op.inputs) > 2,
                                activation=bool(op.attrs.get("act")))  # fmt: skip
        elif op.kind == "gelu":
            total += elements
        elif op.kind == "attention":
            heads = op.attrs["heads"]
            d = graph.shape(op.output)[-1] // heads
            scores = ops.attention_scores(seq, seq, heads=heads, key_lengths=lengths)
            total += ops.attention(scores, bsz * heads * seq, d)
        elif op.kind == "mean_pool":
            total += ops.masked_mean_pool(int(np.sum(lengths)), bsz, graph.shape(op.output)[-1])
    return total


# ---- execution -------------------------------------------------------------------------------


def run(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the graph's ops in order on vtpu.kernels against its resident weights.

    Feeds: `ids` (B, S) int64; for BERT `lengths` (B,) int32 (each sequence's unpadded length);
    for the Qwen3 graphs `positions` (B, S) int64 and, for decode, each layer's KV cache
    `cache.N` float32 (2, B, kv_heads, T, head_dim), which kv_append updates in place (the
    graph's cache outputs are those same arrays, as the node's KV pages are written in place).
    """
    from vtpu import kernels as K
    from vtpu.kernels import packed

    env: dict[str, Any] = {**graph.weights, **feeds}
    lengths = feeds.get("lengths")
    dies_after = _last_uses(graph)
    for i, op in enumerate(graph.ops):
        a = [env[name] for name in op.inputs]
        kind, attrs = op.kind, op.attrs
        out = a[0] if attrs.get("in_place") else None
        if kind == "gather":
            table, ids = a
            flat = ids.reshape(-1)
            if isinstance(table, packed.PackedWeight):
                y = packed.rows(table, flat)
            else:
                y = _widen(K.gather_rows(table, flat))
            y = y.reshape(*ids.shape, table.shape[1])
        elif kind == "add_row":
            y = K.add(a[0].reshape(-1, a[0].shape[-1]), a[1]).reshape(a[0].shape)
        elif kind == "add_positions":
            x, table = a
            bsz, seq, h = x.shape
            y = K.add(x.reshape(bsz, seq * h), table[:seq].reshape(-1)).reshape(x.shape)
        elif kind == "add":
            y = K.add(a[0].reshape(-1, a[0].shape[-1]), a[1].reshape(-1, a[1].shape[-1]))
            y = y.reshape(a[0].shape)
        elif kind == "layer_norm":
            y = K.layer_norm(a[0], a[1], a[2], attrs["eps"], out=out)
        elif kind == "add_layer_norm":
            y = K.add_layer_norm(a[0], a[1], a[2], a[3], attrs["eps"], out=out)
        elif kind == "linear":
            y = _linear(K, packed, a, attrs)
        elif kind == "gelu":
            y = K.bias_activation(a[0].copy(), None, "gelu")
        elif kind == "attention":
            y = _attention(K, a, attrs, lengths)
        elif kind == "mean_pool":
            y = K.masked_mean_pool(a[0], a[1])
        elif kind == "l2_normalize":
            y = K.l2_normalize(a[0], out=out)
        elif kind == "rms_norm":
            y = K.rms_norm(a[0], a[1], attrs["eps"], out=out)
        elif kind == "add_rms_norm":
            rows = a[0].reshape(-1, a[0].shape[-1])
            total = K.add(rows, a[1].reshape(rows.shape), out=None if out is None else rows)
            total = total.reshape(a[0].shape)
            if op.extra:
                env[op.extra[0]] = total
            y = K.rms_norm(total, a[2], attrs["eps"])
        elif kind == "head_rms_norm":
            x = a[0]
            heads = x.reshape(*x.shape[:-1], attrs["heads"], attrs["head_dim"])
            y = K.rms_norm(heads, a[1], attrs["eps"]).reshape(x.shape)
        elif kind == "rope":
            y = _rope(a[0], a[1], attrs["heads"], attrs["head_dim"], attrs["theta"])
        elif kind == "qk_norm_rope":
            y = qk_norm_rope(a, attrs, out)
        elif kind == "silu":
            y = silu(a[0])
        elif kind == "mul":
            y = np.multiply(a[0], a[1])
        elif kind == "swiglu":
            n = a[0].shape[-1] // 2
            y = silu(a[0][..., :n])
            y *= a[0][..., n:]
        elif kind == "kv_append":
            y = kv_append(a, attrs)
        elif kind == "cached_attention":
            y = cached_attention(a, attrs)
        else:
            raise CompileError(f"{op.text()}: no kernel for {kind!r}")
        env[op.output] = y
        for name in dies_after.get(i, ()):
            del env[name]  # freed as soon as read for the last time: the next op reuses it
    return {name: env[name] for name in graph.outputs}


def _linear(K: Any, packed: Any, a: list, attrs: dict) -> np.ndarray:
    bias = a[2] if len(a) > 2 else None
    act = attrs.get("act", "none")
    dtype = packed_linear_dtype(a[1])
    if dtype is not None:  # a reduced-precision encoder's: the kernel its weight is packed for
        return LINEAR_WEIGHTS[dtype][1](a[0], a[1], bias, act)
    if not isinstance(a[1], packed.PackedWeight):
        return K.linear(a[0], _widen(a[1]), bias, act, trans_w=bool(attrs.get("trans_w")))
    x = a[0]
    y = packed.matmul(x.reshape(-1, x.shape[-1]), a[1])
    if bias is not None or act != "none":
        K.bias_activation(y, bias, act)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _last_uses(graph: Graph) -> dict[int, list[str]]:
    """Op index -> the intermediate values it reads for the last time (weights, feeds and
    outputs stay)."""
    last: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            last[name] = i
    keep = set(graph.weights) | set(graph.inputs) | set(graph.outputs)
    out: dict[int, list[str]] = {}
    for name, i in last.items():
        if name not in keep:
            out.setdefault(i, []).append(name)
    return out


def _attention(K: Any, a: list, attrs: dict, lengths: np.ndarray) -> np.ndarray:
    """Packed QKV goes to attention_packed; separate (B, S, H) projections are viewed as (B,
    heads, S, D) — a reshape and a transpose — and the result merged back to (B, S, H)."""
    heads = attrs["heads"]
    if "kv_heads" in attrs:
        return gqa_attention(a, attrs, lengths)
    if attrs.get("packed"):  # the fused projection read in place: no split, no merge
        return K.attention_packed(a[0], heads, key_lengths=lengths)
    bsz, seq, width = a[0].shape
    d = width // heads
    q, k, v = (x.reshape(bsz, seq, heads, d).transpose(0, 2, 1, 3) for x in a[:3])
    ctx = K.attention(q, k, v, key_lengths=lengths)
    return np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)).reshape(bsz, seq, heads * d)
