"""phextcc's Qwen3 frontend: a decoder model directory as unfused IR graphs (issue 11;
docs/architecture.md, "LLM decoding (Qwen3)").

The graphs say what the model computes, op by op, with the weights as the checkpoint stores
them (Linear weights (N, K) in the checkpoint's dtype, separate q/k/v and gate/up projections);
the passes decide fusions, packing and layouts (phextcc's module docstring).

- prefill: inputs `ids` (B, S) int64 and `positions` (B, S) int64 (0..S-1 for a fresh prompt);
  output `logits` (B, S, vocab). Causal attention over the graph's own tokens: a batch of
  prompts of different lengths is right-padded, and a padded position never reaches a real one.
- decode: inputs `ids` (B, 1), `positions` (B, 1) (each sequence's tokens already cached) and one
  KV cache per layer, `cache.N` float32 (2, B, kv_heads, T, head_dim); `kv_append` writes the
  token's k and v at its position (in place) and `cached_attention` reads positions 0..position;
  outputs `logits` (B, 1, vocab) and the caches (`lN.cache`, the same arrays). Dense per-sequence
  caches here; the node's paged, PPT-translated cache is vtpu.models.qwen3's.

Ops per layer: rms_norm, linear q/k/v, head_rms_norm (q and k), rope (rotate-half, the config's
theta), attention (causal, grouped-query: heads, kv_heads, head_dim attrs) or kv_append +
cached_attention, linear o, add, rms_norm, linear gate/up, silu, mul, linear down, add; then the
final rms_norm and the lm_head linear (the embedding table when tied). The config is read by
vtpu.models.qwen3.read_config (both dialects; unsupported fields refused by name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vtpu.kernels import packed
from vtpu.kernels.packed import PRECISIONS
from vtpu.models.bert import ModelLoadError
from vtpu.models.qwen3 import (
    CheckpointReader,
    Qwen3Config,
    Qwen3Model,
    checked_table,
    read_config,
)
from vtpu.phextcc import Graph, Op, Value, run


def build_graph(
    directory: Path, name: str | None = None, *, precision: str = "fp32", decode: bool = False
) -> Graph:
    """The prefill graph (or, with decode=True, the decode graph) of a Qwen3 model directory."""
    directory = Path(directory)
    config = read_config(directory)
    return graph_from_weights(config, read_weights(directory, config), name or directory.name,
                              precision=precision, decode=decode)  # fmt: skip


def graph_from_model(model: Qwen3Model, *, decode: bool = False) -> Graph:
    """The graph of a loaded model over its resident, already packed weights, named as the
    checkpoint names them: its fused q/k/v and gate/up weights enter as row slices (views), and
    the fusion passes join them back into views of the same buffers, so the compiled graph and
    the hand-written forward read one resident copy (no second read of the files)."""
    c = model.config
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    weights: dict = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
    if not c.tie_embeddings:
        weights["lm_head.weight"] = model.lm_head
    for n, layer in enumerate(model.layers):
        p = f"model.layers.{n}."
        att, mlp = p + "self_attn.", p + "mlp."
        bounds = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        for t, (lo, hi) in bounds.items():
            weights[f"{att}{t}_proj.weight"] = _rows(layer.wqkv, lo, hi)
        n_mlp = c.intermediate
        weights[mlp + "gate_proj.weight"] = _rows(layer.wgu, 0, n_mlp)
        weights[mlp + "up_proj.weight"] = _rows(layer.wgu, n_mlp, 2 * n_mlp)
        weights.update({
            p + "input_layernorm.weight": layer.ln1,
            p + "post_attention_layernorm.weight": layer.ln2,
            att + "q_norm.weight": layer.q_norm,
            att + "k_norm.weight": layer.k_norm,
            att + "o_proj.weight": layer.wo,
            mlp + "down_proj.weight": layer.wd,
        })  # fmt: skip
    return graph_from_weights(c, weights, model.directory.name, precision=model.precision,
                              decode=decode)  # fmt: skip


def _rows(w: packed.PackedWeight, lo: int, hi: int) -> packed.PackedWeight:
    """Rows lo..hi of a packed weight, as a view (bits and scales as they are)."""
    scale = None if w.scale is None else w.scale[lo:hi]
    return packed.PackedWeight((hi - lo, w.shape[1]), w.precision, w.data[lo:hi], scale)


def read_weights(directory: Path, config: Qwen3Config | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the directory's checkpoint, mapped (not copied) by the model's own reader
    (`vtpu.models.qwen3.CheckpointReader`, which checks names, dtypes and shapes against the
    config): 2-D tensors float32 or raw bf16 bits as stored (float16 widened), 1-D tensors (the
    norms) as float32 copies."""
    directory = Path(directory)
    reader = CheckpointReader(checked_table(directory, config or read_config(directory)))
    return {
        name: reader.raw(name) if len(t.shape) == 2 else reader.float32(name)
        for name, t in reader.table.items()
    }


def graph_from_weights(
    config: Qwen3Config,
    weights: dict[str, np.ndarray],
    name: str,
    *,
    precision: str = "fp32",
    decode: bool = False,
) -> Graph:
    """The unfused graph of a Qwen3 decoder over checkpoint-named weights (module docstring)."""
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"precision {precision!r} is not implemented for Qwen3; choose one of "
            f"{', '.join(PRECISIONS)}"
        )
    c = config
    eps, d = c.rms_eps, c.head_dim
    ops: list[Op] = []

    def op(kind: str, inputs: list[str], output: str, **attrs) -> str:
        ops.append(Op(kind, inputs, output, attrs))
        return output

    q_heads = {"heads": c.heads, "head_dim": d}
    kv_heads = {"heads": c.kv_heads, "head_dim": d}
    gqa = {"heads": c.heads, "kv_heads": c.kv_heads, "head_dim": d}
    x = op("gather", ["model.embed_tokens.weight", "ids"], "emb")
    for n in range(c.layers):
        p = f"model.layers.{n}."
        att, mlp = p + "self_attn.", p + "mlp."
        h = op("rms_norm", [x, p + "input_layernorm.weight"], f"l{n}.h1", eps=eps)
        q, k, v = (op("linear", [h, f"{att}{t}_proj.weight"], f"l{n}.{t}", trans_w=True)
                   for t in "qkv")  # fmt: skip
        q = op("head_rms_norm", [q, att + "q_norm.weight"], f"l{n}.q_norm", **q_heads, eps=eps)
        k = op("head_rms_norm", [k, att + "k_norm.weight"], f"l{n}.k_norm", **kv_heads, eps=eps)
        q = op("rope", [q, "positions"], f"l{n}.q_rope", **q_heads, theta=c.rope_theta)
        k = op("rope", [k, "positions"], f"l{n}.k_rope", **kv_heads, theta=c.rope_theta)
        if decode:
            cache = op("kv_append", [f"cache.{n}", k, v, "positions"], f"l{n}.cache", layer=n,
                       **gqa)  # fmt: skip
            ctx = op("cached_attention", [q, cache, "positions"], f"l{n}.ctx", layer=n, **gqa)
        else:
            ctx = op("attention", [q, k, v], f"l{n}.ctx", **gqa, causal=True)
        o = op("linear", [ctx, att + "o_proj.weight"], f"l{n}.attn_out", trans_w=True)
        r = op("add", [x, o], f"l{n}.res1")
        h = op("rms_norm", [r, p + "post_attention_layernorm.weight"], f"l{n}.h2", eps=eps)
        gate = op("linear", [h, mlp + "gate_proj.weight"], f"l{n}.gate", trans_w=True)
        up = op("linear", [h, mlp + "up_proj.weight"], f"l{n}.up", trans_w=True)
        act = op("silu", [gate], f"l{n}.act")
        m = op("mul", [act, up], f"l{n}.mlp")
        o = op("linear", [m, mlp + "down_proj.weight"], f"l{n}.mlp_out", trans_w=True)
        x = op("add", [r, o], f"l{n}.res2")
    h = op("rms_norm", [x, "model.norm.weight"], "final", eps=eps)
    head = "model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"
    op("linear", [h, head], "logits", trans_w=True)

    seq = 1 if decode else "S"
    values = {"ids": Value("ids", ("B", seq), "i64"),
              "positions": Value("positions", ("B", seq), "i64")}  # fmt: skip
    inputs = ["ids", "positions"]
    outputs = ["logits"]
    if decode:
        for n in range(c.layers):
            values[f"cache.{n}"] = Value(f"cache.{n}", (2, "B", c.kv_heads, "T", d))
        inputs += [f"cache.{n}" for n in range(c.layers)]
        outputs += [f"l{n}.cache" for n in range(c.layers)]
    produced = {o.output for o in ops} | set(inputs)
    needed = {i for o in ops for i in o.inputs if i not in produced}
    missing = sorted(needed - set(weights))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{name}: weights missing: {', '.join(missing[:5])}{more}")
    # A tied checkpoint may carry lm_head.weight (the embedding's copy); rotary inverse
    # frequencies come from the config. Anything else is a feature this graph lacks.
    unknown = sorted(t for t in set(weights) - needed
                     if t != "lm_head.weight" and not t.endswith("rotary_emb.inv_freq"))  # fmt: skip
    if unknown:
        raise ModelLoadError(
            f"{name}: tensors this Qwen3 graph does not implement: {', '.join(unknown[:5])}"
        )
    tables = {t: weights[t] for t in needed}
    return Graph(name, inputs, outputs, ops, tables, values, precision=precision)


# ---- running a compiled graph ------------------------------------------------------------------


def prefill(graph: Graph, ids: np.ndarray) -> np.ndarray:
    """Logits (B, S, vocab) of prompts `ids` (B, S) from position 0, through phextcc.run."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"prefill: ids must be (B, S), got shape {ids.shape}")
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
    return run(graph, {"ids": ids, "positions": np.ascontiguousarray(positions)})["logits"]


def new_cache(config: Qwen3Config, batch: int, tokens: int) -> dict[str, np.ndarray]:
    """Zeroed decode-graph caches for `batch` sequences of up to `tokens` positions each."""
    shape = (2, batch, config.kv_heads, tokens, config.head_dim)
    return {f"cache.{n}": np.zeros(shape, np.float32) for n in range(config.layers)}


def decode(
    graph: Graph, cache: dict[str, np.ndarray], ids: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """One token per sequence: `ids` (B,) at `positions` (B,) -> logits (B, vocab); the token's
    keys and values are written into `cache` (from new_cache) in place."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1, 1)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 1)
    if ids.shape != positions.shape:
        raise ValueError(f"decode: {ids.shape[0]} ids but {positions.shape[0]} positions")
    out = run(graph, {"ids": ids, "positions": positions, **cache})
    return out["logits"][:, 0]
