"""A BERT-family sentence encoder (all-MiniLM-L6-v2) resident in memory, run on vtpu.kernels.

Loading reads a model directory as Hugging Face and sentence-transformers write it
(`config.json`, `*.safetensors`, `tokenizer.json`, `sentence_bert_config.json`), refuses any
configuration this encoder does not implement with the field's name, and pre-packs the weights
once for the kernels: query, key and value fused into one (K, 3N) matrix so each layer makes one
GEMM for them, every Linear weight transposed to the (K, N) layout `kernels.linear` reads without
a transpose, and the position and token-type embeddings summed into one table (single-sentence
inputs all have token type 0). The pooler is not loaded: sentence embeddings do not use it.

The forward is fp32: embedding gather, then per layer fused QKV, attention with each sequence's
key length as its padding mask, the output projection with the residual folded into its layer
norm (`add_layer_norm`), bias+GELU (exact, erf) fused into the first FFN GEMM, and the second
FFN GEMM with its residual layer norm; then masked mean pooling and L2 normalisation, as
sentence-transformers' Transformer -> Pooling(mean) -> Normalize does.

Reduced precision is chosen per load, for the four Linear weights of every layer (their fp32
copies are dropped; embeddings, norms, attention and pooling stay fp32):
- "bf16": weights rounded to bf16 and packed for AVX-512 BF16's vdpbf16ps
  (`kernels.linear_bf16`); activations rounded to bf16 on every call, products summed in fp32.
  Only where the CPU has AVX512_BF16: elsewhere the load is refused (ModelLoadError) rather than
  run the kernel's scalar twin. It pays on AMD Zen 4 (vdpbf16ps does twice an FMA's multiply-adds
  at the same rate there: ~1.7x fp32 per Linear); PERFORMANCE.md measured it slower than fp32 FMA
  on the Intel Xeon, where it saves memory only.
- "int8": weight-only. Symmetric int8 per output channel and per group of 32 input features
  (`kernels.quantize_int8_groups`), widened to fp32 per call; activations stay fp32. Cosine
  >= 0.999 to sentence-transformers on the varied test set; it saves memory (1.125 bytes per
  weight), not time.
- "int8-dynamic": int8 weights and activations (`kernels.linear_dynamic_int8`: AVX-512 VNNI,
  AVX2 or portable, the same bits on each). Per-row activation scales alone reached only
  cosine 0.96: a handful of BERT's hidden channels carry activations 10-30x the rest (after
  the layer norms and GELU), set every row's step and leave the other channels a few levels.
  So each Linear keeps its INT8_OUTLIERS input channels with the largest activations on
  CALIBRATION_TEXTS (one fp32 pass at load) in fp32; the rest of each row is quantised to 8
  bits between its own min and max (a GELU output is mostly positive: no level is spent on a
  sign it rarely has), and the weights get a scale per output channel and group of 128
  inputs. Cosine >= 0.9994 on the varied set (was 0.960); measured per Linear, 8-bit
  activations, the outliers and the weight groups each bought part of it, and no single
  Linear dominated what was left, so none is kept in fp32.
`compile()` serves every precision with phextcc's SIW program: the packed weights are resident
tensors of their own dtypes (siw: "Packed Linear weights") that D.linear hands to the kernels
`forward` calls, so the two agree bit for bit.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vtpu import kernels as K

# Chunking of a forward's sequences (encode_ids): the share of padded positions tolerated once
# a chunk has enough rows for the GEMMs to run at full speed.
PAD_SHARE = 0.1
MIN_ROWS = 256

# Weight precisions a load may ask for.
PRECISIONS = ("fp32", "bf16", "int8", "int8-dynamic")
INT8_GROUP = 32  # input features per weight scale in the weight-only int8 mode
# int8-dynamic: input features per weight scale, and input channels per Linear kept in fp32
# (those with the largest activations on CALIBRATION_TEXTS).
INT8_DYNAMIC_GROUP = 128
INT8_OUTLIERS = 8
# Run through the fp32 encoder once when an int8-dynamic encoder loads, to find each Linear's
# outlier input channels. Chosen apart from the tests' varied set: prose, code, numbers, other
# scripts, a one-word input.
CALIBRATION_TEXTS = (
    "The weather in Paris was mild this spring, and the markets were busy every morning.",
    "def add(a, b):\n    return a + b  # a tiny function",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "北京是中国的首都。",
    "OK",
    "Order 1234-5678 shipped on 2024-03-05 at 14:30 !!!",
    "Ceci est une phrase en français, avec des accents : é, è, à.",
)


class ModelLoadError(ValueError):
    """A model directory this loader cannot serve; the message names the file or field."""


# config.json fields and the only values this encoder implements.
_REQUIRED_CONFIG = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                    "vocab_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")  # fmt: skip
_FIXED_CONFIG = {
    "model_type": ("bert",),
    "hidden_act": ("gelu",),
    "position_embedding_type": ("absolute", None),
}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    max_seq_length: int  # what sentence-transformers truncates to

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def config_json(directory: Path) -> tuple[Path, dict]:
    """A model directory's config.json as a dict, with its path (for messages); ModelLoadError
    when it is missing, unreadable or not a JSON object. Every model family reads it here."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} is missing: a model directory needs its config.json"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return path, raw


def read_config(directory: Path) -> BertConfig:
    path, raw = config_json(directory)
    for name, allowed in _FIXED_CONFIG.items():
        if raw.get(name) not in allowed:
            raise ModelLoadError(
                f"{path}: {name}={raw.get(name)!r} is not supported (this encoder implements "
                f"{', '.join(repr(a) for a in allowed if a)})"
            )
    missing = [name for name in _REQUIRED_CONFIG if name not in raw]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)}")
    ints = {name: raw[name] for name in _REQUIRED_CONFIG if name != "layer_norm_eps"}
    bad = [n for n, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ModelLoadError(f"{path}: {', '.join(bad)} must be positive integers")
    if ints["hidden_size"] % ints["num_attention_heads"]:
        raise ModelLoadError(
            f"{path}: hidden_size {ints['hidden_size']} is not a multiple of "
            f"num_attention_heads {ints['num_attention_heads']}"
        )
    max_seq = ints["max_position_embeddings"]
    st_path = directory / "sentence_bert_config.json"
    if st_path.exists():
        try:
            max_seq = int(json.loads(st_path.read_text()).get("max_seq_length", max_seq))
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{st_path} is not readable: {exc}") from None
    return BertConfig(
        hidden=ints["hidden_size"],
        heads=ints["num_attention_heads"],
        layers=ints["num_hidden_layers"],
        intermediate=ints["intermediate_size"],
        vocab=ints["vocab_size"],
        max_positions=ints["max_position_embeddings"],
        type_vocab=ints["type_vocab_size"],
        eps=float(raw["layer_norm_eps"]),
        max_seq_length=min(max_seq, ints["max_position_embeddings"]),
    )


def _safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights")
    return files


def _header(path: Path) -> dict:
    """A safetensors file's tensor table, read without touching its data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise ModelLoadError(f"{path}: a header of {size} bytes is not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: unreadable safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header


def _prefix(names: set[str]) -> str:
    """'' or 'bert.': BertModel checkpoints name tensors without it, BertFor* ones with it."""
    if "embeddings.word_embeddings.weight" in names:
        return ""
    if "bert.embeddings.word_embeddings.weight" in names:
        return "bert."
    raise ModelLoadError("no embeddings.word_embeddings.weight among the weights: not a BERT model")


def _wanted(config: BertConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the encoder keeps, with the shape it must have."""
    h, i, p = config.hidden, config.intermediate, prefix
    shapes = {
        f"{p}embeddings.word_embeddings.weight": (config.vocab, h),
        f"{p}embeddings.position_embeddings.weight": (config.max_positions, h),
        f"{p}embeddings.token_type_embeddings.weight": (config.type_vocab, h),
        f"{p}embeddings.LayerNorm.weight": (h,),
        f"{p}embeddings.LayerNorm.bias": (h,),
    }
    for n in range(config.layers):
        layer = f"{p}encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            shapes[f"{layer}attention.self.{proj}.weight"] = (h, h)
            shapes[f"{layer}attention.self.{proj}.bias"] = (h,)
        shapes[f"{layer}attention.output.dense.weight"] = (h, h)
        shapes[f"{layer}attention.output.dense.bias"] = (h,)
        shapes[f"{layer}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{layer}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{layer}intermediate.dense.weight"] = (i, h)
        shapes[f"{layer}intermediate.dense.bias"] = (i,)
        shapes[f"{layer}output.dense.weight"] = (h, i)
        shapes[f"{layer}output.dense.bias"] = (h,)
        shapes[f"{layer}output.LayerNorm.weight"] = (h,)
        shapes[f"{layer}output.LayerNorm.bias"] = (h,)
    return shapes


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"precision {precision!r} is not implemented; choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "bf16" and not _has_bf16():
        raise ModelLoadError(
            "this CPU has no AVX512_BF16 (vdpbf16ps), so bf16 would run a slow scalar loop; "
            "load the model as fp32, int8 or int8-dynamic"
        )
    return precision  # type: ignore[return-value]


def _has_bf16() -> bool:
    f = K.cpu_features()
    return all(f[name] for name in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


def weight_bytes(directory: Path, precision: str = "fp32") -> int:
    """Bytes the packed weights will take, from the config and the safetensors headers alone,
    so a load that would not fit is refused before anything is read. With int8, each Linear
    weight takes 1 byte per element plus a 4-byte scale per output channel and group of 32
    inputs; with int8-dynamic, what `kernels.int8_weight_bytes` counts for it (int8 per
    element, scales per group of 128 inputs, INT8_OUTLIERS fp32 input channels); with bf16,
    2 bytes per element of its packed form (N padded to 16, K to 2). Query, key and value
    count as the one fused (3H, H) weight they are packed into."""
    check_precision(precision)
    config = read_config(directory)
    names: set[str] = set()
    for path in _safetensors_files(directory):
        names.update(_header(path))
    shapes = _wanted(config, _prefix(names))
    # The position and token-type tables become one table of max_positions rows.
    type_table = shapes[next(n for n in shapes if n.endswith("token_type_embeddings.weight"))]
    total = 4 * (sum(int(np.prod(s)) for s in shapes.values()) - int(np.prod(type_table)))
    if precision == "fp32":
        return total
    h, i = config.hidden, config.intermediate
    for n, k in [(3 * h, h), (h, h), (i, h), (h, i)] * config.layers:  # (N, K) as packed
        total -= 4 * n * k
        if precision == "int8":
            total += n * k + 4 * n * -(-k // INT8_GROUP)
        elif precision == "bf16":
            total += 2 * (-(-n // 16) * 16) * (-(-k // 2) * 2)
        else:
            total += K.int8_weight_bytes(
                n, k, group=INT8_DYNAMIC_GROUP, outliers=min(INT8_OUTLIERS, k)
            )
    return total


def read_weights(directory: Path, config: BertConfig) -> dict[str, np.ndarray]:
    """The encoder's weights as float32 arrays by name (without a 'bert.' prefix), each checked
    against the shape the config implies."""
    from safetensors import safe_open

    files = _safetensors_files(directory)
    names: set[str] = set()
    for path in files:
        names.update(_header(path))
    prefix = _prefix(names)
    shapes = _wanted(config, prefix)
    missing = sorted(set(shapes) - names)
    if missing:
        raise ModelLoadError(
            f"{directory}: weights missing: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    out: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name not in shapes:
                    continue  # the pooler, position_ids: not used
                array = f.get_tensor(name)
                if tuple(array.shape) != shapes[name]:
                    raise ModelLoadError(
                        f"{path}: {name} has shape {tuple(array.shape)}, the config says "
                        f"{shapes[name]}"
                    )
                if array.dtype.kind != "f":
                    raise ModelLoadError(f"{path}: {name} is {array.dtype}, not floating point")
                out[name[len(prefix) :]] = np.ascontiguousarray(array, dtype=np.float32)
    return out


# A Linear weight in the encoder's precision: fp32 (K, N), else its packed reduced form.
_Weight = np.ndarray | K.Int8GroupWeight | K.Int8Weight | K.Bf16Weight
_LINEARS = ("wqkv", "wo", "w1", "w2")
# How _run applies a layer's Linear: (x, layer index, weight attribute, bias, activation) -> y.
_Linear = Callable[[np.ndarray, int, str, np.ndarray, str], np.ndarray]


@dataclass
class _Layer:
    wqkv: _Weight  # (H, 3H): query, key, value side by side
    bqkv: np.ndarray
    wo: _Weight  # (H, H)
    bo: np.ndarray
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    w1: _Weight  # (H, I)
    b1: np.ndarray
    w2: _Weight  # (I, H)
    b2: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray


class BertEncoder:
    """A loaded, pre-packed sentence encoder: token ids in, L2-normalised embeddings out."""

    def __init__(self, directory: Path, precision: str = "fp32") -> None:
        self.precision = check_precision(precision)
        self.directory = directory
        self.config = read_config(directory)
        raw = read_weights(directory, self.config)
        c = self.config

        def take(name: str) -> np.ndarray:
            return raw.pop(name)

        self.word = take("embeddings.word_embeddings.weight")
        # Single-sentence inputs have token type 0: fold its row into the position table.
        types = take("embeddings.token_type_embeddings.weight")
        self.pos_type = take("embeddings.position_embeddings.weight") + types[0]
        self.emb_ln = (take("embeddings.LayerNorm.weight"), take("embeddings.LayerNorm.bias"))
        self.layers: list[_Layer] = []
        for n in range(c.layers):
            pre = f"encoder.layer.{n}."

            def packed(name: str, pre: str = pre) -> np.ndarray:
                return np.ascontiguousarray(take(pre + name).T)

            qkv = [take(f"{pre}attention.self.{x}.weight") for x in ("query", "key", "value")]
            self.layers.append(
                _Layer(
                    wqkv=np.ascontiguousarray(np.concatenate(qkv, axis=0).T),
                    bqkv=np.concatenate(
                        [take(f"{pre}attention.self.{x}.bias") for x in ("query", "key", "value")]
                    ),
                    wo=packed("attention.output.dense.weight"),
                    bo=take(pre + "attention.output.dense.bias"),
                    ln1_g=take(pre + "attention.output.LayerNorm.weight"),
                    ln1_b=take(pre + "attention.output.LayerNorm.bias"),
                    w1=packed("intermediate.dense.weight"),
                    b1=take(pre + "intermediate.dense.bias"),
                    w2=packed("output.dense.weight"),
                    b2=take(pre + "output.dense.bias"),
                    ln2_g=take(pre + "output.LayerNorm.weight"),
                    ln2_b=take(pre + "output.LayerNorm.bias"),
                )
            )
        self.compiled: Any = None  # a phextcc SiwModule once compile() ran
        self.tokenizer = _load_tokenizer(directory, c.max_seq_length)
        self._untruncated = _load_tokenizer(directory, None)  # to count, for truncate: false
        if precision == "int8-dynamic":
            ranges = self.input_ranges(CALIBRATION_TEXTS)
        for n, layer in enumerate(self.layers):
            for attr in _LINEARS if precision != "fp32" else ():
                w = getattr(layer, attr)
                if precision == "int8":
                    setattr(layer, attr, K.quantize_int8_groups(w, INT8_GROUP))
                elif precision == "bf16":
                    setattr(layer, attr, K.pack_bf16_weight(w, trans_w=True))
                else:
                    top = np.argsort(-ranges[n][attr], kind="stable")[:INT8_OUTLIERS]
                    packed = K.pack_int8_weight(
                        w, trans_w=True, group=INT8_DYNAMIC_GROUP, outliers=np.sort(top)
                    )
                    setattr(layer, attr, packed)

    def input_ranges(self, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Per layer and Linear ("wqkv", "wo", "w1", "w2"): the largest |input| each input
        channel reached while the fp32 weights encoded `texts` (before they are quantised)."""
        ranges: list[dict[str, np.ndarray]] = [{} for _ in self.layers]

        def record(x: np.ndarray, n: int, attr: str, bias: np.ndarray, act: str) -> np.ndarray:
            seen = np.abs(x).max(axis=0)
            ranges[n][attr] = np.maximum(ranges[n].get(attr, seen), seen)
            return K.linear(x, getattr(self.layers[n], attr), bias, act)

        self.encode_ids(
            self.tokenize(list(texts)), forward=lambda ids, lengths: self._run(ids, lengths, record)
        )
        return ranges

    def compile(self) -> None:
        """Compile the model with phextcc to an SIW program, which encode_ids then runs on a
        sentron against the resident weights; forward() stays as the hand-written reference.

        The program runs its layers as one loop body over stacked (layers, ...) weights; the
        per-layer arrays of `self.layers` then become views of those stacks, so the
        hand-written forward and the program read one resident copy. In a reduced precision
        the packed Linear weights are stacked as they are (a tuple of the layers' own), the
        biases and norms as in fp32."""
        from vtpu.phextcc import bert as phextcc_bert

        self.compiled = phextcc_bert.siw_module(self)

    @property
    def nbytes(self) -> int:
        """Bytes of resident weights (the tokenizer's few MB are not counted)."""
        arrays = [self.word, self.pos_type, *self.emb_ln]
        for layer in self.layers:
            arrays.extend(vars(layer).values())
        extra = self.compiled.resident_bytes if self.compiled is not None else 0
        return sum(a.nbytes for a in arrays) + extra

    @property
    def dimensions(self) -> int:
        return self.config.hidden

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with [CLS] and [SEP], truncated to max_seq_length as sentence-transformers
        truncates (the longest first; for one sentence: its end)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def token_count(self, text: str) -> int:
        """Tokens of `text` before truncation (for callers that refuse to truncate)."""
        return len(self._untruncated.encode(text).ids)

    def encode_ids(
        self,
        sequences: list[list[int]],
        max_batch_tokens: int = 4096,
        forward: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """(n, hidden) float32 embeddings, L2-normalised. Sequences are sorted by length and run
        in padded chunks of at most max_batch_tokens positions (at least one sequence each); a
        chunk also ends where padding would pass PAD_SHARE of it, once it holds MIN_ROWS
        positions, so mixed lengths do not pay for their longest. `forward(ids, lengths)` runs
        a chunk: the compiled SIW program once compile() ran, else the hand-written one."""
        if forward is None:
            forward = self.compiled.forward if self.compiled is not None else self.forward
        n = len(sequences)
        out = np.empty((n, self.config.hidden), dtype=np.float32)
        order = sorted(range(n), key=lambda i: -len(sequences[i]))
        start = 0
        while start < n:
            longest = max(1, len(sequences[order[start]]))
            end, real = start + 1, longest
            while end < n and (end - start + 1) * longest <= max_batch_tokens:
                length = max(1, len(sequences[order[end]]))
                padded = (end - start + 1) * longest
                if real >= MIN_ROWS and padded - (real + length) > PAD_SHARE * padded:
                    break
                real += length
                end += 1
            chunk = order[start:end]
            out[chunk] = forward(*pad([sequences[i] for i in chunk]))
            start = end
        return out

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The hand-written forward of one padded chunk: ids (B, S), lengths (B,) int32."""
        kernel = {"fp32": K.linear, "bf16": K.linear_bf16, "int8": K.linear_weight_int8,
                  "int8-dynamic": K.linear_dynamic_int8}[self.precision]  # fmt: skip

        def linear(x: np.ndarray, n: int, attr: str, bias: np.ndarray, act: str) -> np.ndarray:
            return kernel(x, getattr(self.layers[n], attr), bias, act)

        return self._run(ids, lengths, linear)

    def _run(self, ids: np.ndarray, lengths: np.ndarray, linear: _Linear) -> np.ndarray:
        c = self.config
        bsz, seq = ids.shape
        h, nh = c.hidden, c.heads
        x = K.gather_rows(self.word, ids.reshape(-1)).reshape(bsz, seq * h)
        K.add(x, self.pos_type[:seq].reshape(-1), out=x)
        x = x.reshape(bsz * seq, h)
        K.layer_norm(x, *self.emb_ln, c.eps, out=x)
        for n, layer in enumerate(self.layers):
            qkv = linear(x, n, "wqkv", layer.bqkv, "none").reshape(bsz, seq, 3 * h)
            ctx = K.attention_packed(qkv, nh, key_lengths=lengths).reshape(bsz * seq, h)
            a = linear(ctx, n, "wo", layer.bo, "none")
            x = K.add_layer_norm(a, x, layer.ln1_g, layer.ln1_b, c.eps, out=a)
            f = linear(x, n, "w1", layer.b1, "gelu")
            o = linear(f, n, "w2", layer.b2, "none")
            x = K.add_layer_norm(o, x, layer.ln2_g, layer.ln2_b, c.eps, out=o)
        pooled = K.masked_mean_pool(x.reshape(bsz, seq, h), lengths)
        return K.l2_normalize(pooled, out=pooled)


def pad(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as (ids (B, S) int64 padded with 0, lengths (B,) int32)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    ids = np.zeros((len(sequences), max(1, int(lengths.max(initial=0)))), dtype=np.int64)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = s
    return ids, lengths


def _load_tokenizer(directory: Path, max_length: int | None):
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: the encoder needs its tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a tokenizers file: {exc}") from None
    tok.no_padding()  # tokenizer.json may pad to a fixed length; we pad per batch
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length=max_length)
    return tok
