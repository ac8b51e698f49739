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
  when the two are independent (they issue concurrently) and C.halt into the last word;
- alike layers (`find_layers`) are emitted once, as the body of a C.loop driving register r0
  with the layer's index: each weight operand that differs per layer is a register-relative
  view of a resident (layers, ...) stack (the layers' own arrays where they already lie at a
  constant step in one buffer, else a stack whose slices then replace the graph's arrays, so
  one copy stays resident), and the residual stream a layer hands the next stays in one
  buffer (if liveness cannot place it so, the layers are unrolled instead);
- a reduced-precision encoder's Linear weights are its kernels' packed weights (siw: "Packed
  Linear weights": bf16lin, int8lin, int8dyn), resident as they are and read by D.linear with
  the bias and activation fused as in fp32; a loop stacks them as the tuple of the layers' own
  weights, a (layers, K, N) resident whose register-relative views select layer r0.

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

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vtpu import siw
from vtpu.arena import Arena
from vtpu.kernels.decoder import rope_inv_freq
from vtpu.phextcc import CompileError, Graph, root_array, weight_shape
from vtpu.sentron import Prepared, Sentron, arena_bytes_for, packed_linear_dtype
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
    they issue concurrently), and C.halt rides on the last word.

    ("loop", {}) marks where a loop's body starts (the next slot opens a word); ("C", fields)
    puts a C.loop on the word of the slot before it, jumping back to the latest mark."""
    words = siw.empty_words(len(slots) or 1)
    n = 0
    owners = siw.roots(program)
    starts: list[int] = []
    fence = False  # the next slot opens a word: a loop's body starts there
    for pipe, fields in slots:
        if pipe == "loop":
            starts.append(n)
            fence = True
            continue
        if pipe == "C":
            if not n or words["c_op"][n - 1]:
                raise CompileError("a C.loop needs a word of its own body to ride on")
            for k, v in fields.items():
                words[k][n - 1] = v
            words["c_target"][n - 1] = starts.pop()
            continue
        if pipe == "S" and n and not fence:
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
        fence = False
    if n and words["c_op"][n - 1]:  # the program ends with a loop: halt after it
        n += 1
    words = words[: max(n, 1)]
    words["c_op"][-1] = COp.HALT
    return words


@dataclass
class LayerLoop:
    """Ops start .. start + period * count - 1 of a graph are `count` layers alike: each the
    same ops, attributes and shapes, reading its own weights of one shape per operand.

    `carried`: a value layer 0 reads from before it -> the layer-local index of the op whose
    output the next layer reads in its place (the residual stream). `weights`: (layer-local
    op, input position) -> the weight each layer reads there (an operand all layers share is
    not listed)."""

    start: int
    period: int
    count: int
    carried: dict[str, int]
    weights: dict[tuple[int, int], list[str]]

    @property
    def end(self) -> int:
        return self.start + self.period * self.count


def find_layers(graph: Graph) -> LayerLoop | None:
    """The longest run of alike layers (at least two) that lowers as one loop body, else None.
    Alike: see LayerLoop; besides, a layer's values are read only by itself and (the carried
    one) by the next layer or, for the last layer, by the ops after the run."""
    ops, best = graph.ops, None
    for period in range(1, len(ops) // 2 + 1):
        for start in range(len(ops) - 2 * period + 1):
            if best is not None and (len(ops) - start) < best.period * best.count:
                break
            found = _match_layers(graph, start, period)
            if found is not None and (best is None or found.period * found.count > best.period
                                      * best.count):  # fmt: skip
                best = found
    return best


def _match_layers(graph: Graph, start: int, period: int) -> LayerLoop | None:
    ops = graph.ops
    where = {name: i for i, op in enumerate(ops) for name in op.results}
    if any(op.kind not in _LOOPABLE or op.extra for op in ops[start : start + period]):
        return None
    carried: dict[str, int] = {}
    slots: dict[tuple[int, int], list[str]] = {}
    count = 1
    while start + (count + 1) * period <= len(ops):
        base = start + count * period
        trial_carried = dict(carried)
        trial_slots = {k: [*v] for k, v in slots.items()}
        for j in range(period):
            a, b = ops[start + j], ops[base + j]
            if (a.kind, a.attrs, len(a.inputs), b.extra) != (b.kind, b.attrs, len(b.inputs), []):
                break
            if graph.shape(a.output) != graph.shape(b.output):
                break
            if not all(
                _alike_input(
                    graph, where, x, y, m, j, start, base, period, trial_carried, trial_slots
                )  # fmt: skip
                for m, (x, y) in enumerate(zip(a.inputs, b.inputs, strict=True))
            ):
                break
        else:
            carried, slots, count = trial_carried, trial_slots, count + 1
            continue
        break
    if count < 2 or not carried:
        return None
    loop = LayerLoop(start, period, count, carried, slots)
    return loop if _contained(graph, loop) else None


def _alike_input(graph, where, x, y, m, j, start, base, period, carried, slots) -> bool:
    """Input m of layer-local op j reads x in layer 0 and y in the layer at `base`: alike?"""
    weights = graph.weights
    if x in weights:
        if y not in weights or graph.shape(y) != graph.shape(x):
            return False
        if x != y or (j, m) in slots:
            slots.setdefault((j, m), [x] * ((base - start) // period)).append(y)
        return _stack_dtype(weights[x]) == _stack_dtype(weights[y]) is not None
    at_x, at_y = where.get(x, -1), where.get(y, -1)
    if start <= at_x < start + period:  # made in layer 0: y made by the same op of its layer
        return at_y - base == at_x - start
    if x == y:
        return True  # read alike by every layer (the lengths)
    local = at_y - (base - period)  # the previous layer's value, in x's place
    if not 0 <= local < period or y != graph.ops[at_y].output:
        return False
    return carried.setdefault(x, local) == local


def _contained(graph: Graph, loop: LayerLoop) -> bool:
    """A layer's values are read by itself, the carried one by the next layer, and the last
    layer's by the ops after the run; what layer 0 carries in is read by layer 0 only; no
    layer makes a graph output."""
    ops = graph.ops
    carried_out = set(loop.carried.values())
    for i, op in enumerate(ops[loop.start : loop.end]):
        layer, local = divmod(i, loop.period)
        if op.output in graph.outputs:
            return False
        last = layer == loop.count - 1
        for reader in graph.consumers(op.output):
            at = ops.index(reader)
            r_layer = (at - loop.start) // loop.period if loop.start <= at < loop.end else None
            if r_layer == layer or (last and at >= loop.end):
                continue
            if not (local in carried_out and r_layer == layer + 1):
                return False
    for x in loop.carried:
        if any(not loop.start <= ops.index(r) < loop.start + loop.period
               for r in graph.consumers(x)):  # fmt: skip
            return False
    return True


# Ops a loop body may hold: their weight operands are read as they are (no view of a weight).
_LOOPABLE = {"layer_norm", "add_layer_norm", "linear", "gelu", "attention", "add", "add_row",
             "mean_pool", "l2_normalize"}  # fmt: skip


def _stack_dtype(weight: object) -> str | None:
    """The SIW dtype of a weight a layer loop can stack: f32 arrays and packed Linear weights."""
    if isinstance(weight, np.ndarray):
        return "f32" if weight.dtype == np.float32 else None
    return packed_linear_dtype(weight)


def _resident_type(binding: object) -> tuple[str, tuple[int, ...]]:
    """(dtype, shape) of a resident binding: an f32 array, a packed Linear weight ((K, N)), or a
    layer stack of packed weights ((layers, K, N), a tuple)."""
    if isinstance(binding, tuple):
        dtype, shape = _resident_type(binding[0])
        return dtype, (len(binding), *shape)
    return packed_linear_dtype(binding) or "f32", weight_shape(binding)


@dataclass(frozen=True)
class Indexed:
    """A layer's weight as a register-relative view: element `offset + r0 * step` of the
    resident `stack`, in shape `shape`."""

    stack: str
    offset: int
    step: int
    shape: tuple[int, ...]
    name: str  # the view's SIW name


LAYER_REGISTER = 0  # r0: the register the layer loop drives


def _layout(arrays: list[np.ndarray], span: int) -> tuple[np.ndarray, int, int] | None:
    """(root, first, step) when array k starts at element first + k * step of one C-contiguous
    float32 root array, each dense with `span` elements of the root from there; else None."""
    root = root_array(arrays[0])
    if root.dtype != np.float32 or not root.flags.c_contiguous or root.ndim > siw.MAX_NDIM:
        return None
    at = root.__array_interface__["data"][0]
    offsets = []
    for a in arrays:
        offset, odd = divmod(a.__array_interface__["data"][0] - at, 4)
        if root_array(a) is not root or not a.flags.c_contiguous or odd or offset < 0:
            return None
        if offset + span > root.size:
            return None
        offsets.append(offset)
    step = offsets[1] - offsets[0] if len(offsets) > 1 else 0
    if step < 0 or any(o != offsets[0] + k * step for k, o in enumerate(offsets)):
        return None
    return root, offsets[0], step


def _adjacent(first: np.ndarray, second: np.ndarray) -> bool:
    """second starts where first ends, in one buffer (a (2, n) gamma | beta)."""
    return (
        root_array(first) is root_array(second)
        and first.shape == second.shape
        and first.flags.c_contiguous
        and second.flags.c_contiguous
        and second.__array_interface__["data"][0]
        == first.__array_interface__["data"][0] + first.nbytes
    )


def _layers_name(names: list[str]) -> str:
    """One name for the layers' weights: layer 0's, its layer number as N where the names
    differ only there (`encoder.layer.N.output.dense.weight`)."""
    a, b = names[0], names[1]
    head = len(os.path.commonprefix([a, b]))
    tail = len(os.path.commonprefix([a[head:][::-1], b[head:][::-1]]))
    if a[head : len(a) - tail] == "0" and b[head : len(b) - tail] == "1":
        return f"{a[:head]}N{a[len(a) - tail :]}"
    return f"{a}_layers"


def lower(
    graph: Graph,
    bsz: int,
    seq: int,
    names: dict,
    resident: dict[str, np.ndarray],
    loop: LayerLoop | None = None,
    indexed: dict[tuple[int, int], Indexed] | None = None,
) -> tuple[Program, str]:
    """The graph as one SIW program for (bsz, seq); returns it and its output tensor's name.
    `names` maps graph weight names (and (gamma, beta) pairs) to the SIW names of `resident`.

    With `loop` (find_layers), its layers are emitted once, as the body of a C.loop over the
    layers driving r0, reading the weights `indexed` names for each (layer-local op, input)
    through register-relative views of their stacks; the value a layer carries to the next
    stays in one buffer. Where the buffers cannot be laid out so, the layers are unrolled."""
    b = _Builder()
    weights = graph.weights
    indexed = indexed if loop is not None else None

    def dims(shape) -> tuple[int, ...]:
        return tuple(bsz if d == "B" else seq if d == "S" else int(d) for d in shape)

    # The ops in issue order (layers 1.. dropped: layer 0 is the body), the last layer's
    # values read under layer 0's names.
    order = list(range(len(graph.ops)))
    rename: dict[str, str] = {}
    body = range(0)
    if loop is not None:
        body = range(loop.start, loop.start + loop.period)
        order = [*range(loop.start), *body, *range(loop.end, len(graph.ops))]
        last = loop.end - loop.period
        for j in range(loop.period):
            rename[graph.ops[last + j].output] = graph.ops[loop.start + j].output
    seq_ops = [graph.ops[i] for i in order]
    inputs_of = [[rename.get(n, n) for n in op.inputs] for op in seq_ops]

    def weight_operands(i: int) -> list[str | None]:
        """Op i's operands as SIW names where they are weights (a layer's: its view), the
        (gamma, beta) pair of add_layer_norm as one; None where they are values."""
        op, ins = seq_ops[i], inputs_of[i]
        j = i - body.start if i in body else None
        out: list[str | None] = []
        for m, name in enumerate(ins[:2] if op.kind == "add_layer_norm" else ins):
            ix = indexed.get((j, m)) if indexed and j is not None else None
            out.append(ix.name if ix else names[name] if name in weights else None)
        if op.kind == "add_layer_norm":
            ix = indexed.get((j, 2)) if indexed and j is not None else None
            out.append(ix.name if ix else names[tuple(ins[2:4])])
        return out

    operands_of = [weight_operands(i) for i in range(len(seq_ops))]
    used = {name for ops in operands_of for name in ops if name is not None}
    used |= {ix.stack for ix in (indexed or {}).values()}
    for sname, array in resident.items():
        if sname in used:
            b.tensor(sname, *_resident_type(array), "resident")
    feeds = {}
    for name in graph.inputs:
        v = graph.values[name]
        feeds[name] = b.tensor(name, v.dtype, dims(v.shape), "input")
    for ix in (indexed or {}).values():
        dtype = b.tensors[b.ids[ix.stack]].dtype
        b.tensor(ix.name, dtype, ix.shape, "view", base=ix.stack, offset=ix.offset,
                 strides=siw.c_strides(ix.shape), reg=LAYER_REGISTER, step=ix.step)  # fmt: skip
    last_use: dict[str, int] = {}
    for i, names_in in enumerate(inputs_of):
        for name in names_in:
            last_use[name] = i
    prefer: dict[str, str] = {}  # value -> the buffer it should take (a carried one's)
    if loop is not None:
        first_after = loop.start + loop.period  # index in seq_ops after the body
        made = {op.output for op in seq_ops[loop.start : first_after]}
        for names_in in inputs_of[loop.start : first_after]:
            for name in names_in:  # what every pass reads stays live through the body
                if name not in made and name not in weights and name not in loop.carried:
                    last_use[name] = max(last_use[name], first_after)
        for x, local in loop.carried.items():
            prefer[_chain_head(seq_ops, inputs_of, loop.start + local, last_use, made)] = x
    buffer_of: dict[str, str] = {}  # IR value -> SIW buffer holding it
    free: dict[tuple[int, ...], list[str]] = {}
    buffers: list[str] = []
    outputs = set(graph.outputs)

    def operand(name: str) -> str:
        if name in buffer_of:
            return buffer_of[name]
        if name in feeds:
            return feeds[name]
        raise CompileError(f"{name} is read before any op produces it")

    def buffer(value: str, shape: tuple[int, ...]) -> str:
        pool = free.get(shape)
        want = buffer_of.get(prefer.get(value, ""))
        if pool and want in pool:
            pool.remove(want)
            return want
        if pool and value not in outputs:
            return pool.pop()
        name = value if value in outputs else f"act{len(buffers)}"
        buffers.append(name)
        return b.tensor(name, "f32", shape, "zeros", output=value in outputs)

    for i, op in enumerate(seq_ops):
        if loop is not None and i == body.start:
            b.slots.append(("loop", {}))
        shape = dims(graph.shape(op.output))
        flat = (int(np.prod(shape[:-1])), shape[-1])
        names_in = inputs_of[i]
        srcs = [w if w is not None else operand(name)
                for w, name in zip(operands_of[i], names_in, strict=False)]  # fmt: skip
        first = names_in[0] if names_in else None
        if (
            op.kind in _IN_PLACE
            and first in buffer_of
            and last_use.get(first) == i
            and names_in.count(first) == 1
            and op.output not in outputs
        ):
            dst = buffer_of[first]
        else:
            dst = buffer(op.output, flat)
        _emit(b, op, dst, srcs, shape, bsz, seq)
        buffer_of[op.output] = dst
        for name in set(names_in):
            held = buffer_of.get(name)
            if held is not None and last_use.get(name) == i and held != dst:
                free.setdefault(b.tensors[b.ids[held]].shape, []).append(held)
        if loop is not None and i == body.stop - 1:
            for x, local in loop.carried.items():
                if buffer_of[seq_ops[loop.start + local].output] != buffer_of[x]:
                    return lower(graph, bsz, seq, names, resident)  # unrolled after all
            b.slots.append(("C", {"c_op": int(COp.LOOP), "c_count": loop.count - 1,
                                  "c_flags": siw.LOOP_REG | LAYER_REGISTER}))  # fmt: skip
    program = Program(b.tensors)
    program.words = pack_words(program, b.slots)
    (out,) = graph.outputs
    return program, buffer_of[out]


def _chain_head(ops, inputs_of, i: int, last_use: dict[str, int], made: set[str]) -> str:
    """The value whose buffer op i's output will sit in: follow ops that write over their
    first operand (as `lower` decides) back to the one that takes a buffer."""
    producer = {op.output: k for k, op in enumerate(ops)}
    while True:
        op, first = ops[i], (inputs_of[i][0] if inputs_of[i] else None)
        if not (op.kind in _IN_PLACE and first in made and last_use.get(first) == i
                and inputs_of[i].count(first) == 1):  # fmt: skip
            return op.output
        i = producer[first]


def _emit(b: _Builder, op, dst: str, srcs: list[str], shape, bsz, seq) -> None:
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
        b.d(DOp.ADD_LAYERNORM, dst, *srcs, imm=attrs["eps"])
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
            self._sentron = Sentron(Arena(need), overlap=False, keep=True)
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
    BertEncoder.encode_ids; one forward runs at a time.

    With `loop` (the default), alike layers run as one loop body (find_layers) over stacked
    weights; where the layers' arrays were separate, the stacks replace them in
    `graph.weights` (equal values, one copy). loop=False unrolls the layers."""

    def __init__(self, graph: Graph, *, cache_size: int = 32, loop: bool = True) -> None:
        super().__init__(cache_size)
        self.graph = graph
        weights = graph.weights
        taken: set[str] = set()
        self.names: dict = {}  # graph weight name, or (gamma, beta) pair -> SIW name
        self.resident: dict[str, np.ndarray] = {}
        self._made: list[np.ndarray] = []  # arrays this module allocated
        self.loop = find_layers(graph) if loop else None
        self.indexed: dict[tuple[int, int], Indexed] = {}
        if self.loop is not None:
            self._stack_layers(self.loop, taken)
        pairs = [(op.inputs[2], op.inputs[3]) for op in graph.ops if op.kind == "add_layer_norm"]
        for pair in dict.fromkeys(pairs):
            gamma, beta = weights[pair[0]], weights[pair[1]]
            found = _layout([gamma], 2 * gamma.size) if _adjacent(gamma, beta) else None
            if found is not None:  # gamma then beta in one buffer: read them as one
                root, first, _ = found
                array = root.reshape(-1)[first : first + 2 * gamma.size].reshape(2, -1)
            else:
                array = np.ascontiguousarray(np.stack([gamma, beta]), dtype=np.float32)
                self._made.append(array)
            self.names[pair] = siw_name(f"{pair[0]}_and_beta", taken)
            self.resident[self.names[pair]] = array
        for op in graph.ops:
            for j, name in enumerate(op.inputs):
                if op.kind == "add_layer_norm" and j >= 2:
                    continue
                if name in weights and name not in self.names:
                    self.names[name] = siw_name(name, taken)
                    self.resident[self.names[name]] = weights[name]

    def _stack_layers(self, loop: LayerLoop, taken: set[str]) -> None:
        """Each weight operand of the layers as one resident (layers, ...) array the loop's
        register indexes: the layers' arrays themselves where they already lie at a constant
        step in one buffer, else a stack of copies whose slices then replace the graph's
        arrays (so the graph, and an encoder sharing them, keep one copy). Packed Linear
        weights (a reduced-precision encoder's) are stacked as the tuple of the layers' own
        weights, a (layers, K, N) resident whose views select one: nothing is copied."""
        weights = self.graph.weights
        ops = self.graph.ops
        stacks: dict[int, str] = {}  # id(root) -> its SIW name
        for (j, m), layer_names in loop.weights.items():
            op = ops[loop.start + j]
            pair = op.kind == "add_layer_norm" and m >= 2
            if pair and m == 3 and (j, 2) in loop.weights:
                continue
            if pair:  # gamma and beta read as one (2, n) operand
                gammas = loop.weights.get((j, 2), [op.inputs[2]] * loop.count)
                betas = loop.weights.get((j, 3), [op.inputs[3]] * loop.count)
                parts = [[weights[g], weights[b]] for g, b in zip(gammas, betas, strict=True)]
                shape = (2, weights[gammas[0]].size)
                label = f"{_layers_name(gammas)}_and_beta"
                found = None
                if all(_adjacent(*p) for p in parts):
                    found = _layout([p[0] for p in parts], 2 * shape[1])
                key = (j, 2)
            else:
                parts = [[weights[n]] for n in layer_names]
                shape = self.graph.shape(layer_names[0])
                label = _layers_name(layer_names)
                key = (j, m)
                if _stack_dtype(parts[0][0]) != "f32":  # packed Linear weights: a tuple of them
                    name = siw_name(f"{label}_all", taken)
                    self.resident[name] = tuple(p[0] for p in parts)
                    self.indexed[key] = Indexed(name, 0, int(np.prod(shape)), shape,
                                                siw_name(label, taken))  # fmt: skip
                    continue
                found = _layout([p[0] for p in parts], parts[0][0].size)
            if found is None:
                stack = np.ascontiguousarray(np.stack([np.stack(p) if pair else p[0]
                                                       for p in parts]), dtype=np.float32)  # fmt: skip
                self._made.append(stack)
                names = list(zip(gammas, betas, strict=True)) if pair else layer_names
                for k, group in enumerate(names):  # the graph reads the stack's slices
                    for part, name in enumerate(group if pair else [group]):
                        weights[name] = stack[k, part] if pair else stack[k]
                found = (stack, 0, stack[0].size)
            root, first, step = found
            if id(root) not in stacks:
                stacks[id(root)] = siw_name(f"{label}_all", taken)
                self.resident[stacks[id(root)]] = root
            self.indexed[key] = Indexed(stacks[id(root)], first, step, shape,
                                        siw_name(label, taken))  # fmt: skip

    @property
    def resident_bytes(self) -> int:
        """Bytes this module adds to the graph's weights: stacked norm parameters or layer
        weights that the graph's arrays do not view (the layer stacks replace them)."""
        roots = {id(root_array(w)) for w in self.graph.weights.values()
                 if isinstance(w, np.ndarray)}  # fmt: skip
        return sum(a.nbytes for a in self._made if id(a) not in roots)

    def program(self, bsz: int, seq: int) -> tuple[Program, str]:
        return lower(self.graph, bsz, seq, self.names, self.resident, self.loop, self.indexed)

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
