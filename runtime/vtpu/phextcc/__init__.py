"""phextcc, the model compiler: model graph -> IR -> passes -> SIW words on the sentron.

A frontend (`phextcc.bert`) reads a model's architecture and resident weights into a small IR:
a `Graph` of `Op`s over named `Value`s, in program order, with symbolic batch (`B`) and sequence
(`S`) axes. Passes rewrite it — shape inference, constant folding of the embedding tables, QKV
fusion, bias + GELU fusion, residual + layer-norm fusion, weight pre-packing, dead-value removal,
in-place planning —
and `vtpu compile MODEL` prints the IR after each one. `run` interprets a compiled graph
against its resident weights, one kernel call per op (the reference); `phextcc.lower` lowers it
to SIW programs the sentron runs (`vtpu compile MODEL --siw`).

Not yet: tiling and prefetch passes, int8/bf16. The IR is meant to carry the Qwen3 decoder
too: ops are kernel-level, weights are named constants, shapes are symbolic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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

    def text(self) -> str:
        attrs = "".join(f" {k}={_attr_text(v)}" for k, v in self.attrs.items())
        return f"{self.output} = {self.kind}({', '.join(self.inputs)}){attrs}"


def _attr_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Graph:
    name: str
    inputs: list[str]
    outputs: list[str]
    ops: list[Op]
    weights: dict[str, np.ndarray]  # resident constants by name
    values: dict[str, Value] = field(default_factory=dict)

    def shape(self, name: str) -> tuple[Dim, ...]:
        if name in self.weights:
            return tuple(self.weights[name].shape)
        value = self.values.get(name)
        if value is None or value.shape is None:
            raise CompileError(f"{name} has no shape yet: run infer_shapes first")
        return value.shape

    def consumers(self, name: str) -> list[Op]:
        return [op for op in self.ops if name in op.inputs]

    def text(self) -> str:
        """The IR as a person reads it: inputs, weights with their shapes and bytes, then ops."""
        lines = [f"graph {self.name}"]
        for name in self.inputs:
            v = self.values[name]
            lines.append(f"  input  {name}: {v.dtype}{_shape_text(v.shape)}")
        total = sum(w.nbytes for w in self.weights.values())
        lines.append(f"  weights: {len(self.weights)} tensors, {total} bytes")
        for op in self.ops:
            shape = self.values.get(op.output)
            note = f"  : {_shape_text(shape.shape)}" if shape and shape.shape else ""
            lines.append(f"  {op.text()}{note}")
        lines.append(f"  return {', '.join(self.outputs)}")
        return "\n".join(lines)


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
        graph.values.setdefault(op.output, Value(op.output)).shape = out
    return graph


def _same(a: tuple, b: tuple, what: str) -> None:
    if a != b:
        raise ValueError(f"{what}: {_shape_text(a)} != {_shape_text(b)}")


def _linear_shape(s: list, attrs: dict) -> tuple:
    x, w = s[0], s[1]
    n, k = (w[0], w[1]) if attrs.get("trans_w") else (w[1], w[0])
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
    concatenated weights (one GEMM instead of three), and the attention reads it packed."""
    for att in [op for op in graph.ops if op.kind == "attention" and not op.attrs.get("packed")]:
        producers = [_producer(graph, name) for name in att.inputs[:3]]
        if not all(p and p.kind == "linear" and len(p.inputs) == 3 for p in producers):
            continue
        if len({p.inputs[0] for p in producers}) != 1 or len({bool(p.attrs.get("trans_w"))
                                                              for p in producers}) != 1:  # fmt: skip
            continue
        if any(len(graph.consumers(p.output)) != 1 for p in producers):
            continue
        trans = bool(producers[0].attrs.get("trans_w"))
        axis = 0 if trans else 1
        base = att.output
        graph.weights[f"{base}.wqkv"] = np.concatenate(
            [graph.weights[p.inputs[1]] for p in producers], axis=axis
        )
        graph.weights[f"{base}.bqkv"] = np.concatenate(
            [graph.weights[p.inputs[2]] for p in producers]
        )
        fused = Op("linear", [producers[0].inputs[0], f"{base}.wqkv", f"{base}.bqkv"],
                   f"{base}.qkv", {"trans_w": True} if trans else {})  # fmt: skip
        graph.ops[graph.ops.index(producers[0])] = fused
        for p in producers[1:]:
            graph.ops.remove(p)
        att.inputs = [fused.output, att.inputs[3]]
        att.attrs["packed"] = True
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
    stream is read once and the sum never written back on its own."""
    for op in [o for o in graph.ops if o.kind == "layer_norm"]:
        src = _producer(graph, op.inputs[0])
        if src is None or src.kind != "add" or len(graph.consumers(src.output)) != 1:
            continue
        fused = Op("add_layer_norm", [*src.inputs, *op.inputs[1:]], op.output, dict(op.attrs))
        graph.ops[graph.ops.index(op)] = fused
        graph.ops.remove(src)
    return graph


def pack_weights(graph: Graph) -> Graph:
    """Linear weights stored (N, K) as PyTorch keeps them are transposed once to the (K, N)
    layout the GEMM reads directly; every constant becomes C-contiguous float32."""
    for op in graph.ops:
        if op.kind == "linear" and op.attrs.pop("trans_w", False):
            name = op.inputs[1]
            if len(graph.consumers(name)) != 1:
                raise CompileError(f"{op.text()}: weight {name} is shared; pack a copy per use")
            graph.weights[name] = graph.weights[name].T
    for name, w in graph.weights.items():
        graph.weights[name] = np.ascontiguousarray(w, dtype=np.float32)
    return graph


def drop_dead(graph: Graph) -> Graph:
    """Weights and values no op reads any more (the tables folded, the unfused projections)."""
    used = {name for op in graph.ops for name in op.inputs} | set(graph.outputs)
    graph.weights = {k: v for k, v in graph.weights.items() if k in used}
    produced = {op.output for op in graph.ops} | set(graph.inputs)
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


_IN_PLACE_KINDS = {"add_layer_norm", "layer_norm", "l2_normalize"}


PASSES: list[tuple[str, Callable[[Graph], Graph]]] = [
    ("infer_shapes", infer_shapes),
    ("fold_embedding_tables", fold_embedding_tables),
    ("fuse_qkv", fuse_qkv),
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
    return next((op for op in graph.ops if op.output == name), None)


def _rename(graph: Graph, old: str, new: str) -> None:
    for op in graph.ops:
        op.inputs = [new if n == old else n for n in op.inputs]
    graph.outputs = [new if n == old else n for n in graph.outputs]


def count_ops(graph: Graph, lengths: np.ndarray, seq: int) -> int:
    """The ops one run retires for a batch of len(lengths) sequences padded to `seq`, from the
    one op-count table (vtpu.ops) the kernels count with, so it equals what they add up."""
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
    """Execute the graph's ops in order on vtpu.kernels against its resident weights. Feeds:
    `ids` (B, S) int64, `lengths` (B,) int32 (each sequence's unpadded length)."""
    from vtpu import kernels as K

    env: dict[str, Any] = {**graph.weights, **feeds}
    lengths = feeds["lengths"]
    dies_after = _last_uses(graph)
    for i, op in enumerate(graph.ops):
        a = [env[name] for name in op.inputs]
        kind, attrs = op.kind, op.attrs
        if kind == "gather":
            table, ids = a
            y = K.gather_rows(table, ids.reshape(-1)).reshape(*ids.shape, table.shape[1])
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
            out = a[0] if attrs.get("in_place") else None
            y = K.layer_norm(a[0], a[1], a[2], attrs["eps"], out=out)
        elif kind == "add_layer_norm":
            out = a[0] if attrs.get("in_place") else None
            y = K.add_layer_norm(a[0], a[1], a[2], a[3], attrs["eps"], out=out)
        elif kind == "linear":
            bias = a[2] if len(a) > 2 else None
            y = K.linear(a[0], a[1], bias, attrs.get("act", "none"),
                         trans_w=bool(attrs.get("trans_w")))  # fmt: skip
        elif kind == "gelu":
            y = K.bias_activation(a[0].copy(), None, "gelu")
        elif kind == "attention":
            y = _attention(K, a, attrs, lengths)
        elif kind == "mean_pool":
            y = K.masked_mean_pool(a[0], a[1])
        elif kind == "l2_normalize":
            y = K.l2_normalize(a[0], out=a[0] if attrs.get("in_place") else None)
        else:
            raise CompileError(f"{op.text()}: no kernel for {kind!r}")
        env[op.output] = y
        for name in dies_after.get(i, ()):
            del env[name]  # freed as soon as read for the last time: the next op reuses it
    return {name: env[name] for name in graph.outputs}


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
    if attrs.get("packed"):  # the fused projection read in place: no split, no merge
        return K.attention_packed(a[0], heads, key_lengths=lengths)
    bsz, seq, width = a[0].shape
    d = width // heads
    q, k, v = (x.reshape(bsz, seq, heads, d).transpose(0, 2, 1, 3) for x in a[:3])
    ctx = K.attention(q, k, v, key_lengths=lengths)
    return np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)).reshape(bsz, seq, heads * d)
