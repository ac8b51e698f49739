"""A Qwen3-architecture decoder resident in memory, with a paged KV cache (issue 11;
docs/architecture.md, "LLM decoding (Qwen3)").

Loading reads a directory as Hugging Face writes it: `config.json`, `*.safetensors` (fp32, bf16
or fp16 tensors, one file or shards), and when present `tokenizer.json`, `tokenizer_config.json`
(chat template, eos token), `chat_template.jinja` and `generation_config.json` (eos ids).

Config: both dialects load -- `rope_theta` at the top level (with `rope_scaling` null or
"default"; older transformers and most published checkpoints) and `rope_parameters` {"rope_type":
"default", "rope_theta"} (transformers 5). Every field is honoured, known to be irrelevant to
inference (initializer_range, use_cache, dtype, attention_dropout, generation defaults, ...), or
refused with its name: other rope types, sliding-window attention, attention biases, an
activation other than silu, layer types other than full attention, quantization_config, and any
field this loader does not know. A missing `tie_word_embeddings` is read from the weights (tied
when there is no lm_head.weight), since transformers' default for it changed between versions.

Weights are packed once by vtpu.kernels.packed in the precision chosen at load ("fp32", "bf16",
"int8": weight-only, per output channel): q, k and v projections fused into one weight, gate and
up into one, so a layer makes four matmuls; the embedding table is packed too and serves as the
lm_head when tied (`packed.rows` for the lookup). Norm weights stay fp32.

The forward, per layer: RMSNorm, the fused QKV matmul, then one kernel (vtpu.kernels.decoder.store)
that RMS-normalises each q and k head (q_norm, k_norm), applies rotary embeddings (rotate-half
with the config's theta, positions = cache positions) and writes k and v into the sequence's
cache page; attention (a prefill chunk: causal over the sequence's cached keys through
vtpu.kernels.attention; decode, and a one-token chunk: one query per sequence read in place
from its pages by decoder.decode_attention), grouped-query with any ratio, the output projection
and residual, RMSNorm, SwiGLU and the down projection. head_dim is the config's, independent of
hidden_size / heads. Prefill returns the last position's logits, decode one row per sequence,
batched: M = len(seqs) rows through every matmul.

`compile()` (the registry calls it for every precision) lowers prefill and decode with phextcc to
SIW programs over the same paged cache (phextcc.lower.DecoderModule, paged: the arena bound
in place, each step's PPT-translated frames as the program's page table); prefill() and decode()
then run those on a sentron. The hand-written forward stays as the reference (`reference=True`):
the same kernels in the same order, so the two agree bit for bit in every precision.

The KV cache (vtpu.models.kvcache) is allocated at load; every step translates the sequences'
page coordinates through the Phext Page Table. Thread-safety: prefill and decode run on one
worker thread; free() and cache_stats() may be called from any thread.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtpu import kernels as K
from vtpu.kernels import decoder, packed
from vtpu.models.bert import ModelLoadError, config_json
from vtpu.models.kvcache import CacheFull, PagedKVCache, Sequence

__all__ = [
    "CacheFull",
    "ModelLoadError",
    "PRECISIONS",
    "Qwen3Config",
    "Qwen3Model",
    "Sequence",
    "is_qwen3",
    "read_config",
    "weight_bytes",
]

PRECISIONS = packed.PRECISIONS
# Positions per prefill pass: bounds the activations of a long prompt (the pages for the whole
# prompt are taken before the first pass, so a prompt that does not fit changes nothing).
PREFILL_CHUNK = 512

# config.json fields that do not change what inference computes.
_IRRELEVANT = frozenset({
    "initializer_range", "use_cache", "dtype", "torch_dtype", "attention_dropout",
    "transformers_version", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "chunk_size_feed_forward", "id2label", "label2id", "num_labels",
    "problem_type", "tokenizer_class", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "finetuning_task", "task_specific_params", "prefix", "is_decoder", "sep_token_id",
    "decoder_start_token_id", "cross_attention_hidden_size",
    # generation defaults that older transformers wrote into config.json: the request decides
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})  # fmt: skip
# Fields that may be present only with a value that turns their feature off.
_MUST_BE_OFF = {
    "attention_bias": (False,),
    "use_sliding_window": (False,),
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
    "tie_encoder_decoder": (False,),
    "pruned_heads": ({},),
}
# Read when sliding-window attention is on, which is refused: meaningless otherwise.
_SLIDING_ONLY = frozenset({"sliding_window", "max_window_layers"})
_HONOURED = frozenset({
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    "rope_parameters", "rope_scaling", "layer_types", "bos_token_id", "eos_token_id",
    "pad_token_id",
})  # fmt: skip
_ST_DTYPES = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}


@dataclass(frozen=True)
class Qwen3Config:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    max_position: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


# ---- config --------------------------------------------------------------------------------


def is_qwen3(directory: Path) -> bool:
    """Whether config.json names the qwen3 model type (False when it is missing or unreadable)."""
    try:
        return config_json(directory)[1].get("model_type") == "qwen3"
    except ModelLoadError:
        return False


def _positive_int(path: Path, raw: dict, name: str, default: object = ...) -> int:
    if name not in raw or (raw[name] is None and default is not ...):
        if default is ...:
            raise ModelLoadError(f"{path}: {name} is missing")
        return default  # type: ignore[return-value]
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelLoadError(f"{path}: {name} must be a positive integer, got {value!r}")
    return value


def _token_ids(path: Path, name: str, value: object) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [] if value is None else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ModelLoadError(f"{path}: {name} must be token ids, got {value!r}")
    return tuple(items)


def _rope_theta(path: Path, raw: dict) -> float:
    """rope_theta from either dialect; anything but default rotary embeddings is refused."""
    theta = raw.get("rope_theta")
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ModelLoadError(f"{path}: rope_parameters must be an object, got {params!r}")
        for key in params:
            if key not in ("rope_type", "rope_theta"):
                raise ModelLoadError(
                    f"{path}: rope_parameters.{key} is not supported (this loader implements "
                    "default rotary embeddings: rope_type 'default' and rope_theta)"
                )
        if params.get("rope_type", "default") != "default":
            raise ModelLoadError(
                f"{path}: rope_parameters.rope_type={params['rope_type']!r} is not supported "
                "(only 'default' rotary embeddings are implemented)"
            )
        if "rope_theta" in params:
            if theta is not None and theta != params["rope_theta"]:
                raise ModelLoadError(
                    f"{path}: rope_theta={theta!r} and rope_parameters.rope_theta="
                    f"{params['rope_theta']!r} disagree"
                )
            theta = params["rope_theta"]
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        extra = set(scaling) - {"rope_type", "type", "rope_theta"} if kind == "default" else {1}
        if kind != "default" or extra:
            raise ModelLoadError(
                f"{path}: rope_scaling={scaling!r} is not supported (only default rotary "
                "embeddings are implemented: rope_scaling must be null)"
            )
    if theta is None:
        return 10000.0  # transformers' default for Qwen3
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
        raise ModelLoadError(f"{path}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def read_config(directory: Path) -> Qwen3Config:
    """The model's shape from config.json; anything unsupported raises ModelLoadError naming it."""
    directory = Path(directory)
    path, raw = config_json(directory)
    if raw.get("model_type") != "qwen3":
        raise ModelLoadError(
            f"{path}: model_type={raw.get('model_type')!r} is not supported (this loader "
            "implements 'qwen3')"
        )
    for name in raw:
        if name in _HONOURED or name in _IRRELEVANT or name in _SLIDING_ONLY:
            continue
        if name in _MUST_BE_OFF:
            if raw[name] not in _MUST_BE_OFF[name] and raw[name] is not None:
                raise ModelLoadError(
                    f"{path}: {name}={raw[name]!r} is not supported (this loader implements "
                    f"{name}={_MUST_BE_OFF[name][0]!r})"
                )
            continue
        raise ModelLoadError(
            f"{path}: the field {name!r} is not supported by this Qwen3 loader; remove it if it "
            "does not change the model, otherwise this model cannot be served"
        )
    arch = raw.get("architectures")
    if arch is not None and (not isinstance(arch, list) or set(arch) - {"Qwen3ForCausalLM"}):
        raise ModelLoadError(
            f"{path}: architectures={arch!r} is not supported (this loader serves Qwen3ForCausalLM)"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(
            f"{path}: hidden_act={raw['hidden_act']!r} is not supported (Qwen3's MLP is SwiGLU: "
            "'silu')"
        )
    hidden = _positive_int(path, raw, "hidden_size")
    layers = _positive_int(path, raw, "num_hidden_layers")
    heads = _positive_int(path, raw, "num_attention_heads")
    kv_heads = _positive_int(path, raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelLoadError(
            f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
            f"{kv_heads}"
        )
    if "head_dim" in raw and raw["head_dim"] is not None:
        head_dim = _positive_int(path, raw, "head_dim")
    elif hidden % heads:
        raise ModelLoadError(
            f"{path}: head_dim is missing and hidden_size={hidden} is not a multiple of "
            f"num_attention_heads={heads}"
        )
    else:
        head_dim = hidden // heads
    if head_dim % 2 or head_dim > decoder.MAX_HEAD_DIM:
        raise ModelLoadError(
            f"{path}: head_dim={head_dim} is not supported (rotary embeddings need an even "
            f"head_dim, at most {decoder.MAX_HEAD_DIM})"
        )
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise ModelLoadError(
                f"{path}: layer_types must list {layers} layer types, got {layer_types!r}"
            )
        other = sorted({t for t in layer_types if t != "full_attention"}, key=str)
        if other:
            raise ModelLoadError(
                f"{path}: layer_types {other} are not supported (this loader implements "
                "'full_attention' layers)"
            )
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ModelLoadError(f"{path}: rms_norm_eps must be a positive number, got {eps!r}")
    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = "lm_head.weight" not in tensor_table(directory)
    elif not isinstance(tie, bool):
        raise ModelLoadError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    bos = _token_ids(path, "bos_token_id", raw.get("bos_token_id"))
    pad = _token_ids(path, "pad_token_id", raw.get("pad_token_id"))
    return Qwen3Config(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=_positive_int(path, raw, "intermediate_size"),
        vocab=_positive_int(path, raw, "vocab_size"),
        rope_theta=_rope_theta(path, raw),
        rms_eps=float(eps),
        tie_embeddings=tie,
        max_position=_positive_int(path, raw, "max_position_embeddings"),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(path, "eos_token_id", raw.get("eos_token_id")),
        pad_token_id=pad[0] if pad else None,
    )


# ---- weights -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    end: int


def tensor_table(directory: Path) -> dict[str, Tensor]:
    """Every tensor of the *.safetensors files by name, from their headers alone."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights")
    table: dict[str, Tensor] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 << 20:
                    raise ModelLoadError(f"{path}: a header of {size} bytes is not safetensors")
                header = json.loads(f.read(size))
            file_size = path.stat().st_size
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"{path}: unreadable safetensors header: {exc}") from None
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name in table:
                raise ModelLoadError(f"{path}: {name} is also in {table[name].path.name}")
            try:
                begin, end = info["data_offsets"]
                t = Tensor(path, info["dtype"], tuple(info["shape"]), 8 + size + begin,
                            8 + size + end)  # fmt: skip
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(f"{path}: {name} has a malformed header entry") from None
            if t.end > file_size or t.end < t.start:
                raise ModelLoadError(f"{path}: {name} lies outside the file (truncated?)")
            table[name] = t
    return table


def _expected(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, with the shape the config implies."""
    c = config
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab, c.hidden),
        "model.norm.weight": (c.hidden,),
    }
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab, c.hidden)
    for n in range(c.layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden,),
            p + "post_attention_layernorm.weight": (c.hidden,),
            p + "self_attn.q_proj.weight": (q, c.hidden),
            p + "self_attn.k_proj.weight": (kv, c.hidden),
            p + "self_attn.v_proj.weight": (kv, c.hidden),
            p + "self_attn.o_proj.weight": (c.hidden, q),
            p + "self_attn.q_norm.weight": (c.head_dim,),
            p + "self_attn.k_norm.weight": (c.head_dim,),
            p + "mlp.gate_proj.weight": (c.intermediate, c.hidden),
            p + "mlp.up_proj.weight": (c.intermediate, c.hidden),
            p + "mlp.down_proj.weight": (c.hidden, c.intermediate),
        })  # fmt: skip
    return shapes


def checked_table(directory: Path, config: Qwen3Config) -> dict[str, Tensor]:
    table = tensor_table(directory)
    shapes = _expected(config)
    missing = sorted(set(shapes) - set(table))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{directory}: weights missing: {', '.join(missing[:5])}{more}")
    # A tied checkpoint may carry lm_head.weight (the embedding's copy); rotary inverse
    # frequencies are recomputed from the config. Anything else would be a feature we lack.
    unused = sorted(
        n for n in set(table) - set(shapes)
        if n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq")
    )  # fmt: skip
    if unused:
        raise ModelLoadError(
            f"{directory}: tensors this Qwen3 loader does not implement: {', '.join(unused[:5])}"
        )
    for name, shape in shapes.items():
        t = table[name]
        if t.shape != shape:
            raise ModelLoadError(
                f"{t.path}: {name} has shape {t.shape}, the config implies {shape}"
            )
        if t.dtype not in _ST_DTYPES:
            raise ModelLoadError(
                f"{t.path}: {name} is {t.dtype}; this loader reads F32, BF16 and F16 tensors"
            )
        want = math.prod(shape) * np.dtype(_ST_DTYPES[t.dtype]).itemsize
        if t.end - t.start != want:
            raise ModelLoadError(f"{t.path}: {name} holds {t.end - t.start} bytes, not {want}")
    return table


def _packed_bytes(n: int, k: int, precision: str) -> int:
    if precision == "fp32":
        return 4 * n * k
    if precision == "bf16":
        return 2 * n * k
    return n * k + 4 * n  # int8 and its per-channel scale


def _check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ModelLoadError(
            f"precision {precision!r} is not implemented for Qwen3; choose one of "
            f"{', '.join(PRECISIONS)}"
        )
    return precision  # type: ignore[return-value]


def weight_bytes(directory: Path, precision: str = "fp32") -> int:
    """Bytes of the packed weights, from config.json and the safetensors headers alone."""
    _check_precision(precision)
    config = read_config(directory)
    total = 0
    for shape in _expected(config).values():
        total += _packed_bytes(*shape, precision) if len(shape) == 2 else 4 * shape[0]
    return total


class CheckpointReader:
    """Tensors of a checkpoint as arrays: float32, or raw bf16 bits (uint16) where packing
    takes them as they are. The files are mapped, and `done()` drops a tensor's file pages from
    the process once it is packed, so a load's peak RSS is the packed weights plus about one
    tensor, not the packed weights plus the whole checkpoint."""

    def __init__(self, table: dict[str, Tensor]) -> None:
        self.table = table
        self._maps: dict[Path, mmap.mmap] = {}

    def raw(self, name: str) -> np.ndarray:
        t = self.table[name]
        if t.path not in self._maps:
            with open(t.path, "rb") as f:
                self._maps[t.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = np.dtype(_ST_DTYPES[t.dtype])
        array = np.frombuffer(
            self._maps[t.path], dtype, (t.end - t.start) // dtype.itemsize, t.start
        ).reshape(t.shape)
        if dtype == np.float16:
            array = array.astype(np.float32)
        return array

    def float32(self, name: str) -> np.ndarray:
        a = self.raw(name)
        if a.dtype == np.uint16:
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out = np.array(a, dtype=np.float32)  # a resident copy, not a view of the file
        self.done(name)
        return out

    def fused(self, names: list[str]) -> np.ndarray:
        parts = [self.raw(n) for n in names]
        if len({p.dtype for p in parts}) > 1:
            parts = [self.float32(n) for n in names]
        out = np.concatenate(parts, axis=0)
        self.done(*names)
        return out

    def pack(self, name: str, precision: str) -> packed.PackedWeight:
        w = packed.pack(self.raw(name), precision)
        self.done(name)
        return w

    def done(self, *names: str) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for name in names:
            t = self.table[name]
            start = t.start - t.start % mmap.PAGESIZE
            if t.end > start:
                self._maps[t.path].madvise(mmap.MADV_DONTNEED, start, t.end - start)

    def close(self) -> None:
        # Arrays still viewing a map keep it open; it is unmapped when the last one goes.
        self._maps.clear()


@dataclass
class _Layer:
    ln1: np.ndarray
    wqkv: packed.PackedWeight  # (heads + 2 kv_heads) * head_dim rows: q, then k, then v
    q_norm: np.ndarray
    k_norm: np.ndarray
    wo: packed.PackedWeight
    ln2: np.ndarray
    wgu: packed.PackedWeight  # 2 * intermediate rows: gate, then up
    wd: packed.PackedWeight


def _eos_ids(directory: Path, config: Qwen3Config, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen = directory / "generation_config.json"
    if gen.exists():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{gen} is not readable JSON: {exc}") from None
        ids.extend(_token_ids(gen, "eos_token_id", value))
    ids.extend(config.eos_token_ids)
    if not ids and tokenizer is not None:
        token = _tokenizer_config(directory).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            ids.append(tokenizer.token_to_id(token))
    return tuple(dict.fromkeys(ids))


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from None
    return raw if isinstance(raw, dict) else {}


def _chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = _tokenizer_config(directory).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _tokenizer(directory: Path):
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type
        raise ModelLoadError(f"{path}: not a tokenizers file: {exc}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


# ---- the model -----------------------------------------------------------------------------


class Qwen3Model:
    """A loaded Qwen3 decoder and its KV cache (module docstring; interfaces in issue 11)."""

    def __init__(
        self,
        directory: Path,
        precision: str = "fp32",
        *,
        cache_bytes: int,
        page_tokens: int = 16,
    ) -> None:
        self.directory = Path(directory)
        self.precision = _check_precision(precision)
        if (
            isinstance(page_tokens, bool)
            or not isinstance(page_tokens, int)
            or not 1 <= page_tokens <= decoder.MAX_PAGE_TOKENS
        ):
            raise ModelLoadError(
                f"page_tokens must be an integer from 1 to {decoder.MAX_PAGE_TOKENS}, got "
                f"{page_tokens!r}"
            )
        self.config = c = read_config(self.directory)
        table = checked_table(self.directory, c)
        reader = CheckpointReader(table)
        try:
            self.embed = reader.pack("model.embed_tokens.weight", precision)
            self.lm_head = (
                self.embed if c.tie_embeddings else reader.pack("lm_head.weight", precision)
            )
            self.norm = reader.float32("model.norm.weight")
            self.layers: list[_Layer] = []
            for n in range(c.layers):
                p = f"model.layers.{n}."
                attn, mlp = p + "self_attn.", p + "mlp."
                qkv = reader.fused([attn + x + "_proj.weight" for x in "qkv"])
                gate_up = reader.fused([mlp + "gate_proj.weight", mlp + "up_proj.weight"])
                self.layers.append(
                    _Layer(
                        ln1=reader.float32(p + "input_layernorm.weight"),
                        wqkv=packed.pack(qkv, precision),
                        q_norm=reader.float32(attn + "q_norm.weight"),
                        k_norm=reader.float32(attn + "k_norm.weight"),
                        wo=reader.pack(attn + "o_proj.weight", precision),
                        ln2=reader.float32(p + "post_attention_layernorm.weight"),
                        wgu=packed.pack(gate_up, precision),
                        wd=reader.pack(mlp + "down_proj.weight", precision),
                    )
                )
                del qkv, gate_up
        except K.KernelInputError as exc:
            raise ModelLoadError(f"{self.directory}: cannot pack the weights: {exc}") from None
        finally:
            reader.close()
        try:
            self.cache = PagedKVCache(
                layers=c.layers,
                kv_heads=c.kv_heads,
                head_dim=c.head_dim,
                page_tokens=page_tokens,
                cache_bytes=cache_bytes,
            )
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        self.tokenizer = _tokenizer(self.directory)
        self.chat_template = _chat_template(self.directory)
        self.eos_token_ids = _eos_ids(self.directory, c, self.tokenizer)
        self.compiled: tuple | None = None  # phextcc's (prefill, decode) modules: compile()
        self._cos = np.zeros((0, c.head_dim), np.float32)
        self._sin = np.zeros((0, c.head_dim), np.float32)
        half = np.arange(0, c.head_dim, 2, dtype=np.float32) / np.float32(c.head_dim)
        # As transformers computes it, in float32: 1 / theta ** (2i / d).
        self._inv_freq = (
            np.float32(1.0) / np.power(np.float32(c.rope_theta), half, dtype=np.float32)
        ).astype(np.float32)

    # ---- accounting -----------------------------------------------------------------------

    def compile(self) -> None:
        """Compile the decoder with phextcc to SIW programs over the paged KV cache, which
        prefill() and decode() then run on a sentron against the resident weights and the
        cache's arena; the hand-written forward stays as the reference (`reference=True`).
        Programs are lowered per chunk length (prefill) and per batch size (decode) as they
        are first met, then reused (phextcc.lower.DecoderModule)."""
        from vtpu.phextcc import compile_graph
        from vtpu.phextcc import qwen3 as frontend
        from vtpu.phextcc.lower import DecoderModule, Paged

        paged = Paged(self.cache.arena.shape, self._max_pages)
        self.compiled = tuple(
            DecoderModule(compile_graph(frontend.graph_from_model(self, decode=d)), paged=paged)
            for d in (False, True)
        )

    @property
    def _max_pages(self) -> int:
        """Page-table columns of a sequence: the most pages one sequence can hold."""
        P = self.cache.page_tokens
        return min(self.cache.pages_total, -(-self.config.max_position // P))

    @property
    def nbytes(self) -> int:
        """Bytes of resident weights (the tokenizer and the rotary tables are not counted; the
        compiled programs' stacked head gammas are)."""
        total = self.embed.nbytes + self.norm.nbytes
        if self.compiled is not None:
            total += sum(module.resident_bytes for module in self.compiled)
        if self.lm_head is not self.embed:
            total += self.lm_head.nbytes
        for layer in self.layers:
            total += sum(
                w.nbytes
                for w in (layer.ln1, layer.wqkv, layer.q_norm, layer.k_norm, layer.wo,
                          layer.ln2, layer.wgu, layer.wd)
            )  # fmt: skip
        return total

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def cache_stats(self) -> dict:
        return self.cache.stats()

    def pages_needed(self, tokens: int) -> int:
        return self.cache.pages_needed(tokens)

    def new_sequence(self) -> Sequence:
        return self.cache.new_sequence()

    def free(self, seq: Sequence) -> None:
        self.cache.free(seq)

    # ---- forward --------------------------------------------------------------------------

    def _rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (len(positions), head_dim) for these positions, as transformers computes
        them (float32 angles, rotate-half layout: the half-table repeated)."""
        need = int(positions.max()) + 1
        if need > self._cos.shape[0]:
            size = min(max(need, 2 * self._cos.shape[0], 256), self.config.max_position)
            freqs = np.arange(size, dtype=np.float32)[:, None] * self._inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], axis=1)
            self._cos, self._sin = np.cos(emb), np.sin(emb)
        return self._cos[positions], self._sin[positions]

    def _check_ids(self, ids: object, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"{what}: token ids must be a flat list of integers")
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab):
            bad = arr[(arr < 0) | (arr >= self.config.vocab)][0]
            raise ValueError(
                f"{what}: token id {bad} is outside the vocabulary (0-{self.config.vocab - 1})"
            )
        return arr.astype(np.int64)

    def _layer_start(self, x: np.ndarray, layer: _Layer) -> np.ndarray:
        h = K.rms_norm(x, layer.ln1, self.config.rms_eps)
        return packed.matmul(h, layer.wqkv)

    def _layer_end(self, x: np.ndarray, attn: np.ndarray, layer: _Layer) -> None:
        """x += o_proj(attn); x += down(silu(gate) * up), in place."""
        x += packed.matmul(attn, layer.wo)
        h = K.rms_norm(x, layer.ln2, self.config.rms_eps)
        gu = packed.matmul(h, layer.wgu)
        n = self.config.intermediate
        gate, up = gu[:, :n], gu[:, n:]
        a = np.negative(gate)
        np.exp(a, out=a)
        a += 1.0
        np.divide(gate, a, out=a)  # silu(g) = g / (1 + exp(-g)); exp overflow gives -0
        a *= up
        x += packed.matmul(a, layer.wd)

    def _store(self, qkv, layer_index, layer, cos, sin, frames, slots, rows) -> np.ndarray:
        """q/k norm, rotary embeddings and the cache write of `rows` positions; the queries."""
        c = self.config
        q = np.empty((rows, c.heads, c.head_dim), np.float32)
        decoder.store(qkv, layer.q_norm, layer.k_norm, c.rms_eps, cos, sin, self.cache.arena,
                      layer_index, frames, slots, q)  # fmt: skip
        return q

    def _page_table(self, frames, page_start, lengths) -> np.ndarray:
        """The SIW programs' page table (siw: "The node's paged KV cache"): per sequence its
        length after the step, then its frames as the PPT translated them."""
        table = np.zeros((len(lengths), 1 + self._max_pages), np.int64)
        table[:, 0] = lengths
        for b in range(len(lengths)):
            pages = frames[page_start[b] : page_start[b + 1]]
            table[b, 1 : 1 + pages.size] = pages
        return table

    def prefill(self, seq: Sequence, ids: Seq[int], *, reference: bool = False) -> np.ndarray:
        """Run the prompt `ids` after the sequence's cached tokens and cache them; float32
        (vocab,) logits of the last position. Once compile() ran, the SIW programs run it
        unless `reference` asks for the hand-written forward (the two agree bit for bit)."""
        c = self.config
        ids_arr = self._check_ids(ids, "prefill")
        total = ids_arr.size
        if total == 0:
            raise ValueError("prefill: the prompt holds no token")
        start = seq.length
        if start + total > c.max_position:
            raise ValueError(
                f"prefill: {start} cached + {total} new tokens exceed the model's context of "
                f"{c.max_position} positions"
            )
        frames, page_start = self.cache.prepare([seq], [total])
        P = self.cache.page_tokens
        logits = None
        compiled = None if reference else self.compiled
        with np.errstate(over="ignore"):
            for c0 in range(0, total, PREFILL_CHUNK):
                chunk = ids_arr[c0 : c0 + PREFILL_CHUNK]
                positions = start + c0 + np.arange(chunk.size, dtype=np.int64)
                last_chunk = c0 + PREFILL_CHUNK >= total
                if compiled is not None:
                    seen = np.array([positions[-1] + 1])
                    out = compiled[0].run_paged(
                        chunk[None], np.stack(self._rope(positions)),
                        self._page_table(frames, page_start, seen), self.cache.arena,
                        logits=last_chunk,
                    )  # fmt: skip
                    logits = out[0] if last_chunk else None
                    continue
                x = self._prefill_chunk(chunk, positions, frames, P)
                if last_chunk:
                    last = K.rms_norm(x[-1:], self.norm, c.rms_eps)
                    logits = packed.matmul(last, self.lm_head)[0]
        if not seq.freed:
            seq.length = start + total
        return logits

    def _prefill_chunk(self, ids, positions, frames, P) -> np.ndarray:
        c = self.config
        m = ids.size
        seen = int(positions[-1]) + 1  # keys this chunk's last query sees
        n_pages = -(-seen // P)
        cos, sin = self._rope(positions)
        rows_frames = np.ascontiguousarray(frames[positions // P])
        slots = positions % P
        x = packed.rows(self.embed, ids)
        arena = self.cache.arena
        h, d = c.heads, c.head_dim
        if m == 1:  # one query: the decode kernel, as D.paged_attn picks it for one token
            page_start = np.array([0, n_pages], np.int64)
            lengths = np.array([seen], np.int64)
            scratch = np.empty((h, n_pages * P), np.float32)
            attn = np.empty((1, h, d), np.float32)
        for li, layer in enumerate(self.layers):
            qkv = self._layer_start(x, layer)
            q = self._store(qkv, li, layer, cos, sin, rows_frames, slots, m)
            if m == 1:
                decoder.decode_attention(q, arena, li, frames[:n_pages], page_start, lengths,
                                         attn, scratch)  # fmt: skip
                self._layer_end(x, attn.reshape(1, h * d), layer)
                continue
            self._layer_end(x, decoder.prefill_attention(q, arena, li, frames, seen), layer)
        return x

    def decode(
        self, seqs: list[Sequence], ids: list[int], *, reference: bool = False
    ) -> np.ndarray:
        """One token for each sequence, batched; float32 (len(seqs), vocab) logits. Once
        compile() ran, the SIW program runs it unless `reference` asks for the hand-written
        forward (the two agree bit for bit)."""
        c = self.config
        bsz = len(seqs)
        ids_arr = self._check_ids(ids, "decode")
        if ids_arr.size != bsz:
            raise ValueError(f"decode: {bsz} sequences but {ids_arr.size} token ids")
        if bsz == 0:
            return np.zeros((0, c.vocab), np.float32)
        if len({id(s) for s in seqs}) != bsz:
            raise ValueError("decode: a sequence appears twice in one step")
        positions = np.array([s.length for s in seqs], dtype=np.int64)
        if int(positions.max()) + 1 > c.max_position:
            raise ValueError(
                f"decode: a sequence already holds {int(positions.max())} tokens, the model's "
                f"context is {c.max_position} positions"
            )
        frames, page_start = self.cache.prepare(seqs, [1] * bsz)
        P = self.cache.page_tokens
        rows_frames = frames[page_start[:-1] + positions // P]
        slots = positions % P
        lengths = positions + 1
        cos, sin = self._rope(positions)
        if self.compiled is not None and not reference:
            with np.errstate(over="ignore"):
                logits = self.compiled[1].run_paged(
                    ids_arr[:, None], np.stack((cos, sin)),
                    self._page_table(frames, page_start, lengths), self.cache.arena,
                )  # fmt: skip
            for s in seqs:
                if not s.freed:
                    s.length += 1
            return logits
        x = packed.rows(self.embed, ids_arr)
        h, d = c.heads, c.head_dim
        longest = int(np.diff(page_start).max()) * P
        scratch = np.empty((bsz * h, longest), np.float32)
        attn = np.empty((bsz, h, d), np.float32)
        arena = self.cache.arena
        with np.errstate(over="ignore"):
            for li, layer in enumerate(self.layers):
                qkv = self._layer_start(x, layer)
                q = self._store(qkv, li, layer, cos, sin, rows_frames, slots, bsz)
                decoder.decode_attention(q, arena, li, frames, page_start, lengths, attn,
                                         scratch)  # fmt: skip
                self._layer_end(x, attn.reshape(bsz, h * d), layer)
            x = K.rms_norm(x, self.norm, c.rms_eps)
            logits = packed.matmul(x, self.lm_head)
        for s in seqs:
            if not s.freed:
                s.length += 1
        return logits
