"""phextcc's BERT frontend: a sentence-encoder model directory as an unfused IR graph.

The graph says what the model computes, op by op, with the weights as the checkpoint stores
them (Linear weights (N, K), separate Q/K/V, position and token-type tables); the passes, not
the frontend, decide fusions and layouts. Inputs: `ids` (B, S) and `lengths` (B,); output:
`embedding` (B, hidden), mean-pooled and L2-normalised as sentence-transformers does.
"""

from __future__ import annotations

from pathlib import Path

from vtpu.models.bert import BertConfig, read_config, read_weights
from vtpu.phextcc import Graph, Op, Value, run


def forward(graph: Graph):
    """The compiled graph as a chunk forward for BertEncoder.encode_ids(forward=...)."""

    def run_chunk(ids, lengths):
        return run(graph, {"ids": ids, "lengths": lengths})["embedding"]

    return run_chunk


def build_graph(directory: Path, name: str | None = None) -> Graph:
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
    for n in range(config.layers):
        p = f"encoder.layer.{n}."
        proj = [
            op(
                "linear",
                [x, f"{p}attention.self.{t}.weight", f"{p}attention.self.{t}.bias"],
                f"l{n}.{t[0]}",
                trans_w=True,
            )  # fmt: skip
            for t in ("query", "key", "value")
        ]
        ctx = op("attention", [*proj, "lengths"], f"l{n}.ctx", heads=config.heads)
        o = op("linear", [ctx, f"{p}attention.output.dense.weight",
                          f"{p}attention.output.dense.bias"], f"l{n}.attn_out", trans_w=True)  # fmt: skip
        r = op("add", [o, x], f"l{n}.res1")
        x = op("layer_norm", [r, f"{p}attention.output.LayerNorm.weight",
                              f"{p}attention.output.LayerNorm.bias"], f"l{n}.h1", eps=eps)  # fmt: skip
        f = op("linear", [x, f"{p}intermediate.dense.weight", f"{p}intermediate.dense.bias"],
               f"l{n}.ffn_in", trans_w=True)  # fmt: skip
        g = op("gelu", [f], f"l{n}.ffn_act")
        o = op("linear", [g, f"{p}output.dense.weight", f"{p}output.dense.bias"],
               f"l{n}.ffn_out", trans_w=True)  # fmt: skip
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
