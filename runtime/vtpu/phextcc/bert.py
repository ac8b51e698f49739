"""phextcc's BERT frontend: a sentence-encoder model directory as an unfused IR graph.

The graph says what the model computes, op by op, with the weights as the checkpoint stores
them (Linear weights (N, K), separate Q/K/V, position and token-type tables); the passes, not
the frontend, decide fusions and layouts. Inputs: `ids` (B, S) and `lengths` (B,); output:
`embedding` (B, hidden), mean-pooled and L2-normalised as sentence-transformers does.

A loaded encoder in a reduced precision (bf16, int8, int8-dynamic) has its Linear weights
packed for their kernels already (vtpu.sentron.LINEAR_WEIGHTS): the graph reads them as they
are, its QKV projection fused as the encoder packed it (a packed weight does not split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vtpu.models.bert import BertConfig, BertEncoder, read_config, read_weights
from vtpu.phextcc import CompileError, Graph, Op, Value, compile_graph, run
from vtpu.phextcc.lower import SiwModule


def forward(graph: Graph):
    """The compiled graph interpreted op by op on the kernels (phextcc.run), as a chunk forward
    for BertEncoder.encode_ids(forward=...): the reference the SIW program is checked against."""

    def run_chunk(ids, lengths):
        return run(graph, {"ids": ids, "lengths": lengths})["embedding"]

    return run_chunk


def siw_module(encoder: BertEncoder) -> SiwModule:
    """Compile a loaded encoder's model to SIW. The frontend reads the encoder's resident arrays
    in the checkpoint's layout (transposed and sliced views, no second read of the files); the
    compiled graph's weights, once SiwModule has stacked the layers' into (layers, ...) arrays
    and made the graph's per-layer ones slices of them, replace the encoder's own arrays
    (checked equal), so the hand-written forward and the SIW program read one resident copy."""
    graph = compile_graph(graph_from_weights(encoder.config, checkpoint_views(encoder),
                                             encoder.directory.name))  # fmt: skip
    module = SiwModule(graph)
    share_weights(encoder, graph)
    return module


def checkpoint_views(encoder: BertEncoder) -> dict[str, Any]:
    """The encoder's packed weights named and shaped as the checkpoint stores them: views where
    the layout allows; the token-type table as zeros, its row 0 being in `pos_type` already.
    Reduced-precision Linear weights are the encoder's packed ones as they are, QKV fused
    (l{n}.ctx.wqkv and .bqkv, the names fuse_qkv gives the fp32 graph's)."""
    c, h = encoder.config, encoder.config.hidden
    packed = encoder.precision != "fp32"
    w = {
        "embeddings.word_embeddings.weight": encoder.word,
        "embeddings.position_embeddings.weight": encoder.pos_type,
        "embeddings.token_type_embeddings.weight": np.zeros((c.type_vocab, h), np.float32),
        "embeddings.LayerNorm.weight": encoder.emb_ln[0],
        "embeddings.LayerNorm.bias": encoder.emb_ln[1],
    }
    for n, layer in enumerate(encoder.layers):
        p = f"encoder.layer.{n}."
        if packed:
            w[f"l{n}.ctx.wqkv"], w[f"l{n}.ctx.bqkv"] = layer.wqkv, layer.bqkv
        else:
            for j, t in enumerate(("query", "key", "value")):
                w[f"{p}attention.self.{t}.weight"] = layer.wqkv[:, j * h : (j + 1) * h].T
                w[f"{p}attention.self.{t}.bias"] = layer.bqkv[j * h : (j + 1) * h]
        w[f"{p}attention.output.dense.weight"] = layer.wo if packed else layer.wo.T
        w[f"{p}attention.output.dense.bias"] = layer.bo
        w[f"{p}attention.output.LayerNorm.weight"] = layer.ln1_g
        w[f"{p}attention.output.LayerNorm.bias"] = layer.ln1_b
        w[f"{p}intermediate.dense.weight"] = layer.w1 if packed else layer.w1.T
        w[f"{p}intermediate.dense.bias"] = layer.b1
        w[f"{p}output.dense.weight"] = layer.w2 if packed else layer.w2.T
        w[f"{p}output.dense.bias"] = layer.b2
        w[f"{p}output.LayerNorm.weight"] = layer.ln2_g
        w[f"{p}output.LayerNorm.bias"] = layer.ln2_b
    return w


def _same(a: Any, b: Any) -> bool:
    """Equal arrays, or the very same packed weight (the graph keeps the encoder's)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a is b


def share_weights(encoder: BertEncoder, graph: Graph) -> None:
    w = graph.weights
    pairs = [
        (encoder, "word", "embeddings.word_embeddings.weight"),
        (encoder, "pos_type",
         "embeddings.position_embeddings.weight+embeddings.token_type_embeddings.weight[0]"),
    ]  # fmt: skip
    for n, layer in enumerate(encoder.layers):
        p = f"encoder.layer.{n}."
        pairs += [
            (layer, "wqkv", f"l{n}.ctx.wqkv"),
            (layer, "bqkv", f"l{n}.ctx.bqkv"),
            (layer, "wo", f"{p}attention.output.dense.weight"),
            (layer, "bo", f"{p}attention.output.dense.bias"),
            (layer, "ln1_g", f"{p}attention.output.LayerNorm.weight"),
            (layer, "ln1_b", f"{p}attention.output.LayerNorm.bias"),
            (layer, "w1", f"{p}intermediate.dense.weight"),
            (layer, "b1", f"{p}intermediate.dense.bias"),
            (layer, "w2", f"{p}output.dense.weight"),
            (layer, "b2", f"{p}output.dense.bias"),
            (layer, "ln2_g", f"{p}output.LayerNorm.weight"),
            (layer, "ln2_b", f"{p}output.LayerNorm.bias"),
        ]
    for owner, attr, name in pairs:
        if name not in w or not _same(getattr(owner, attr), w[name]):
            raise CompileError(f"compiled weight {name} differs from the encoder's {attr}")
    for owner, attr, name in pairs:
        setattr(owner, attr, w[name])
    emb_ln = ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias")
    if all(np.array_equal(a, w[n]) for a, n in zip(encoder.emb_ln, emb_ln, strict=True)):
        encoder.emb_ln = (w[emb_ln[0]], w[emb_ln[1]])


def build_graph(directory: Path, name: str | None = None, precision: str = "fp32") -> Graph:
    """The frontend's graph of a model directory; in a reduced precision, of the encoder loaded
    so (its weights packed, int8-dynamic calibrated) as BertEncoder.compile reads it."""
    if precision != "fp32":
        encoder = BertEncoder(directory, precision)
        return graph_from_weights(encoder.config, checkpoint_views(encoder),
                                  name or directory.name)  # fmt: skip
    config = read_config(directory)
    return graph_from_weights(config, read_weights(directory, config), name or directory.name)


def graph_from_weights(config: BertConfig, weights: dict, name: str) -> Graph:
    ops: list[Op] = []
    eps = config.eps

    def op(kind: str, inputs: list[str], output: str, **attrs) -> str:
        ops.append(Op(kind, inputs, output, attrs))
        return output

    x = op("gather", ["embeddings.word_embeddings.weight", "ids"], "emb.words")
    # single-sentence inputs: token type 0 for every position
    x = op("add_row", [x, "embeddings.token_type_embeddings.weight[0]"], "emb.typed")
    x = op("add_positions", [x, "embeddings.position_embeddings.weight"], "emb.sum")
    x = op("layer_norm", [x, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"], "h0",
           eps=eps)  # fmt: skip

    def linear(inputs: list[str], output: str) -> str:
        # checkpoint arrays are (N, K); packed weights are read as their kernel packed them
        layout = {"trans_w": True} if isinstance(weights[inputs[1]], np.ndarray) else {}
        return op("linear", inputs, output, **layout)

    for n in range(config.layers):
        p = f"encoder.layer.{n}."
        if f"l{n}.ctx.wqkv" in weights:  # packed, so fused already (checkpoint_views)
            qkv = linear([x, f"l{n}.ctx.wqkv", f"l{n}.ctx.bqkv"], f"l{n}.ctx.qkv")
            ctx = op("attention", [qkv, "lengths"], f"l{n}.ctx", heads=config.heads, packed=True)
        else:
            proj = [
                linear(
                    [x, f"{p}attention.self.{t}.weight", f"{p}attention.self.{t}.bias"],
                    f"l{n}.{t[0]}",
                )  # fmt: skip
                for t in ("query", "key", "value")
            ]
            ctx = op("attention", [*proj, "lengths"], f"l{n}.ctx", heads=config.heads)
        o = linear([ctx, f"{p}attention.output.dense.weight", f"{p}attention.output.dense.bias"],
                   f"l{n}.attn_out")  # fmt: skip
        r = op("add", [o, x], f"l{n}.res1")
        x = op("layer_norm", [r, f"{p}attention.output.LayerNorm.weight",
                              f"{p}attention.output.LayerNorm.bias"], f"l{n}.h1", eps=eps)  # fmt: skip
        f = linear([x, f"{p}intermediate.dense.weight", f"{p}intermediate.dense.bias"],
                   f"l{n}.ffn_in")  # fmt: skip
        g = op("gelu", [f], f"l{n}.ffn_act")
        o = linear([g, f"{p}output.dense.weight", f"{p}output.dense.bias"], f"l{n}.ffn_out")
        r = op("add", [o, x], f"l{n}.res2")
        x = op("layer_norm", [r, f"{p}output.LayerNorm.weight", f"{p}output.LayerNorm.bias"],
               f"l{n}.h2", eps=eps)  # fmt: skip
    pooled = op("mean_pool", [x, "lengths"], "pooled")
    out = op("l2_normalize", [pooled], "embedding")
    tables = dict(weights)
    tables["embeddings.token_type_embeddings.weight[0]"] = tables.pop(
        "embeddings.token_type_embeddings.weight"
    )[0]
    values = {"ids": Value("ids", ("B", "S"), "i64"), "lengths": Value("lengths", ("B",), "i32")}
    return Graph(name, ["ids", "lengths"], [out], ops, tables, values)
