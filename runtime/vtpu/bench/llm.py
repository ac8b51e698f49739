"""`vtpu bench-llm`: Qwen3 decoding on the vTPU against `transformers` (and llama.cpp if built).

Issue 11's benchmark. No real LLM weights can be downloaded here and speed does not depend on
weight values, so the model is a randomly initialised one of Qwen3-0.6B's shape, written once
by `transformers` itself (`Qwen3ForCausalLM(config)`, seeded, `save_pretrained`) into a cache
directory and reused while its config matches (`--layers N` / `--shape tiny` shrink it for
quick runs and tests). Every contender loads the same safetensors.

Each thread count runs in a child process of its own (OpenMP, OpenBLAS and PyTorch fix their
thread counts at start). In it, in this order:

1. the machine's read bandwidth: numpy reductions (max, and a sum of the bytes as float64;
   a float32 sum is compute-bound here) over a 1 GiB array, best of several, on one thread
   and on `threads` Python threads each reducing its own slice (numpy releases the GIL inside
   a reduction, so the slices are read in parallel); the faster reader's figure is the limit;
2. agreement: our fp32 decodes greedily from a short prompt; bf16, int8, `transformers` and
   llama.cpp are then fed the same tokens (teacher forcing, so one early difference does not
   derail the rest) and each step's logits are compared with our fp32's: top-1 match rate and
   max |logit difference| (the slow references over fewer steps);
3. timing, interleaved: every round measures each metric for every contender back to back,
   the contenders' order rotating from round to round; ratios are the median over rounds of
   the per-round ratio (our machines change speed every few seconds, so a ratio of two medians
   taken at different moments would mean little). Metrics: decode tokens/s at batch 1 and 4
   after a 32-token prompt (decode steps only), prefill tokens/s of a 512-token prompt, and
   time to first token of the 32-token prompt (prefill + argmax);
4. the bandwidth limit of each decode figure: bytes read per decode step (resident weights,
   the tied embedding table read whole as the lm_head, plus the KV cache of every sequence at
   the mean context length of the timed steps) / the bandwidth measured in step 1 on the
   same number of threads; each decode figure is shown as a fraction of it.

llama.cpp (`llama-cpp-python`) is timed the same way when importable, on the same weights
converted to GGUF (F32, F16, Q8_0) with the `gguf` package's writer; otherwise the table says
it is not installed.

The module also holds what the suite's `qwen3_decode` workload (workloads.py) needs without
torch: a random Qwen3 written with numpy and safetensors, and a plain-numpy reference decoder.

    vtpu bench-llm [--threads 1,2] [--layers N] [--shape 0.6b|tiny] [--repeats 5] [--json]

A figure that could not be measured (transformers or llama.cpp absent) is left out with the
reason, never estimated. Memory: every engine is resident at once (about 8 GB at 0.6B, fp32
and bf16 twice), so the child's peak RSS is shown but is not a node's figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vtpu.bench import thread_counts

PRECISIONS = ("fp32", "bf16", "int8")
SEED = 20261129
PROMPT_TOKENS = 32  # the "short prompt" before decode, and the TTFT prompt
PREFILL_TOKENS = 512

# Qwen3-0.6B's architecture (its published config.json), and a tiny one for tests.
SHAPES: dict[str, dict[str, Any]] = {
    "0.6b": {
        "hidden": 1024,
        "layers": 28,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 128,
        "intermediate": 3072,
        "vocab": 151936,
        "rope_theta": 1e6,
        "max_position": 40960,
        "tie": True,
    },
    "tiny": {
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "intermediate": 128,
        "vocab": 1024,
        "rope_theta": 1e6,
        "max_position": 4096,
        "tie": True,
    },
}
RMS_EPS = 1e-6
BOS_ID, EOS_ID = 151643, 151645  # Qwen3's; clipped into a tiny vocabulary


# ---- the model on disk ---------------------------------------------------------------------------


def hf_config(shape: dict[str, Any], *, rope_dialect: str = "parameters") -> dict[str, Any]:
    """config.json of a Qwen3 of `shape`, in transformers 5's dialect (`rope_parameters`) or the
    older one (`rope_theta` at the top level, as most published checkpoints have it)."""
    vocab = shape["vocab"]
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": shape["hidden"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "intermediate_size": shape["intermediate"],
        "vocab_size": vocab,
        "max_position_embeddings": shape["max_position"],
        "rms_norm_eps": RMS_EPS,
        "tie_word_embeddings": shape["tie"],
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": shape["layers"],
        "bos_token_id": min(BOS_ID, vocab - 2),
        "eos_token_id": min(EOS_ID, vocab - 1),
        "torch_dtype": "float32",
    }
    if rope_dialect == "parameters":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    else:
        config["rope_theta"] = shape["rope_theta"]
        config["rope_scaling"] = None
    return config


def shape_of(shape_name: str, layers: int | None) -> dict[str, Any]:
    shape = dict(SHAPES[shape_name])
    if layers is not None:
        shape["layers"] = layers
    return shape


def default_model_dir(shape_name: str, layers: int | None) -> Path:
    """~/.cache/vtpu/qwen3-0.6b-random for the real shape; a name of its own for any other, so a
    quick run never overwrites the 2.4 GB model."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vtpu"
    name = f"qwen3-{shape_name}-random"
    if layers is not None and layers != SHAPES[shape_name]["layers"]:
        name += f"-{layers}layers"
    return base / name


_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings")  # fmt: skip


def config_mismatch(directory: Path, shape: dict[str, Any]) -> str | None:
    """None when directory's config.json is a Qwen3 of `shape`, else what differs."""
    try:
        found = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"no readable config.json ({exc})"
    want = hf_config(shape)
    if found.get("model_type") != "qwen3":
        return f"model_type is {found.get('model_type')!r}, not 'qwen3'"
    for key in _SHAPE_KEYS:
        if found.get(key) != want[key]:
            return f"{key} is {found.get(key)!r}, the benchmark's shape has {want[key]!r}"
    if not list(directory.glob("*.safetensors")):
        return "no *.safetensors beside config.json"
    return None


def ensure_model(directory: Path, shape: dict[str, Any], progress: Callable[[str], None]) -> str:
    """Write the random model with transformers unless `directory` already holds it.

    Returns what happened ("reused" or "written in N s"). A directory holding something else is
    refused rather than overwritten.
    """
    if (directory / "config.json").exists():
        mismatch = config_mismatch(directory, shape)
        if mismatch is None:
            return "reused"
        raise BenchError(
            f"{directory} holds another model ({mismatch}); pass another --model-dir or remove it"
        )
    if directory.exists() and any(directory.iterdir()):
        raise BenchError(f"{directory} is not empty and holds no config.json: refusing to write")
    try:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError as exc:
        raise BenchError(
            f"writing the random model needs torch and transformers ({exc}): pip install "
            "'vtpu[dev]', or pass --model-dir with a Qwen3 written elsewhere"
        ) from None
    progress(f"writing a random Qwen3 ({shape['layers']} layers) to {directory} ...")
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    fields = hf_config(shape)
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key)
    model = Qwen3ForCausalLM(Qwen3Config(**fields)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / ".writing"
    partial.mkdir(exist_ok=True)
    model.save_pretrained(partial, safe_serialization=True)
    for item in partial.iterdir():  # config.json last: its presence means "complete"
        if item.name != "config.json":
            item.rename(directory / item.name)
    (partial / "config.json").rename(directory / "config.json")
    partial.rmdir()
    return f"written in {time.perf_counter() - t0:.0f} s"


def random_qwen3_weights(shape: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Float32 weights of a Qwen3 of `shape` under the checkpoint's tensor names, drawn so
    activations stay in a trained model's range and the logits' top-1 is well separated."""
    rng = np.random.default_rng(seed)
    h, d, i = shape["hidden"], shape["head_dim"], shape["intermediate"]
    q, kv = shape["heads"] * d, shape["kv_heads"] * d

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(math.sqrt(cols))

    def norm(n: int) -> np.ndarray:
        return 1 + 0.1 * rng.standard_normal(n, dtype=np.float32)

    # embeddings small beside the layers' output, so the tied lm_head does not just echo the
    # input token back: greedy decoding then walks through the vocabulary
    embed = rng.standard_normal((shape["vocab"], h), dtype=np.float32)
    embed *= np.float32(0.05)
    w = {"model.embed_tokens.weight": embed}
    for n in range(shape["layers"]):
        p = f"model.layers.{n}."
        w |= {
            p + "input_layernorm.weight": norm(h),
            p + "self_attn.q_proj.weight": mat(q, h),
            p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h),
            p + "self_attn.o_proj.weight": mat(h, q),
            p + "self_attn.q_norm.weight": norm(d),
            p + "self_attn.k_norm.weight": norm(d),
            p + "post_attention_layernorm.weight": norm(h),
            p + "mlp.gate_proj.weight": mat(i, h),
            p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
        }
    w["model.norm.weight"] = norm(h)
    if not shape["tie"]:
        w["lm_head.weight"] = mat(shape["vocab"], h)
    return w


def write_qwen3(directory: Path, shape: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """config.json (the older, top-level rope_theta dialect) and model.safetensors, with numpy
    alone: the suite's qwen3_decode runs on every node, which has neither torch nor (without the
    `models` extra) the safetensors package. The format: an 8-byte little-endian header length,
    a JSON header of {name: {dtype, shape, data_offsets}}, then the tensors' bytes in order."""
    directory.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, w in weights.items():
        if w.dtype != np.float32:
            raise ValueError(f"{name}: write_qwen3 writes float32 tensors, not {w.dtype}")
        header[name] = {"dtype": "F32", "shape": list(w.shape),
                        "data_offsets": [offset, offset + w.nbytes]}  # fmt: skip
        offset += w.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the tensors 8-byte aligned, as safetensors does
    with open(directory / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for w in weights.values():
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())
    config = hf_config(shape, rope_dialect="theta")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---- a plain numpy decoder: the workload's baseline and reference --------------------------------


class ReferenceQwen3:
    """Qwen3 in plain numpy float32 (BLAS matmuls), written from the architecture's definition
    (Hugging Face's modeling_qwen3): RMSNorm, q/k RMSNorm per head, rotary embeddings, grouped-
    query attention, SwiGLU MLP. One sequence at a time, its KV cache preallocated."""

    def __init__(self, weights: dict[str, np.ndarray], shape: dict[str, Any]) -> None:
        self.w, self.shape = weights, shape
        d = shape["head_dim"]
        self.inv_freq = (
            1.0 / shape["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
        ).astype(np.float32)
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])

    def new_cache(self, max_tokens: int) -> dict[str, Any]:
        s = self.shape
        size = (s["layers"], s["kv_heads"], max_tokens, s["head_dim"])
        return {"k": np.zeros(size, np.float32), "v": np.zeros(size, np.float32), "length": 0}

    @staticmethod
    def _rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + np.float32(RMS_EPS)) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        # x (T, heads, d); rotate_half convention: pairs (i, i + d/2)
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def forward(self, cache: dict[str, Any], ids: list[int]) -> np.ndarray:
        """Logits (vocab,) of the last of `ids`, appended to the cache."""
        s, w = self.shape, self.w
        heads, kvh, d = s["heads"], s["kv_heads"], s["head_dim"]
        group = heads // kvh
        t, start = len(ids), cache["length"]
        end = start + t
        positions = np.arange(start, end)
        x = w["model.embed_tokens.weight"][np.asarray(ids)]
        # causal mask over (query t, key position)
        masked = np.arange(end)[None, :] > positions[:, None]
        scale = np.float32(1 / math.sqrt(d))
        for n in range(s["layers"]):
            p = f"model.layers.{n}."
            h = self._rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, heads, d)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kvh, d)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kvh, d)
            q = self._rope(self._rms(q, w[p + "self_attn.q_norm.weight"]), positions)
            k = self._rope(self._rms(k, w[p + "self_attn.k_norm.weight"]), positions)
            cache["k"][n, :, start:end] = k.transpose(1, 0, 2)
            cache["v"][n, :, start:end] = v.transpose(1, 0, 2)
            keys, values = cache["k"][n, :, :end], cache["v"][n, :, :end]  # (kvh, end, d)
            # (kvh, group * t, d): each kv head serves `group` query heads
            qg = q.reshape(t, kvh, group, d).transpose(1, 2, 0, 3).reshape(kvh, group * t, d)
            scores = (qg @ keys.transpose(0, 2, 1)) * scale  # (kvh, group * t, end)
            scores = scores.reshape(kvh, group, t, end)
            scores[:, :, masked] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = scores.reshape(kvh, group * t, end) @ values  # (kvh, group * t, d)
            ctx = ctx.reshape(kvh, group, t, d).transpose(2, 0, 1, 3).reshape(t, heads * d)
            x = x + ctx @ w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            act = gate / (1 + np.exp(-gate)) * up  # SiLU(gate) * up
            x = x + act @ w[p + "mlp.down_proj.weight"].T
        cache["length"] = end
        last = self._rms(x[-1:], w["model.norm.weight"])
        return (last @ self.lm_head.T)[0]

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
        """`steps` greedy tokens after `prompt`, and the logits that chose each (steps, vocab)."""
        cache = self.new_cache(len(prompt) + steps)
        logits = self.forward(cache, prompt)
        tokens, rows = [], []
        for i in range(steps):
            rows.append(logits)
            tokens.append(int(np.argmax(logits)))
            if i + 1 < steps:
                logits = self.forward(cache, [tokens[-1]])
        return tokens, np.stack(rows)


def decode_ops(shape: dict[str, Any], context: int, *, lm_head: bool = True) -> int:
    """Arithmetic of one token at `context` cached tokens (a multiply-add is 2): every Linear,
    attention's QK and PV over the context, and the lm_head unless it is a prompt token whose
    logits nobody asks for. Norms, rotary and softmax are left out (a few per cent)."""
    h, d, i = shape["hidden"], shape["head_dim"], shape["intermediate"]
    q, kv = shape["heads"] * d, shape["kv_heads"] * d
    per_layer = 2 * h * (q + 2 * kv) + 2 * q * h + 3 * 2 * h * i + 2 * 2 * q * context
    return shape["layers"] * per_layer + (2 * h * shape["vocab"] if lm_head else 0)


# ---- our model, transformers, llama.cpp: one interface for timing ------------------------------


class BenchError(Exception):
    """A reason the benchmark cannot run, for a person (no traceback)."""


class Contender:
    """One engine at one precision: prefill a prompt, decode a batch, free."""

    name = ""
    weight_bytes = 0
    kv_bytes_per_token = 0  # per sequence, all layers

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, list[int]]:
        """(state, the first greedy token of each prompt)."""
        raise NotImplementedError

    def step(self, state: Any, tokens: list[int]) -> list[int]:
        """One decode step of every sequence in state; the next greedy tokens."""
        raise NotImplementedError

    def logits_step(self, state: Any, token: int) -> np.ndarray:
        """One batch-1 decode step; its logits (vocab,) as float32."""
        raise NotImplementedError

    def prefill_logits(self, prompt: list[int]) -> tuple[Any, np.ndarray]:
        """(state, the logits (vocab,) of the prompt's last position) for one sequence."""
        raise NotImplementedError

    def release(self, state: Any) -> None:
        pass


class Ours(Contender):
    def __init__(self, directory: Path, precision: str, cache_tokens: int) -> None:
        from vtpu.models.qwen3 import Qwen3Model, read_config

        cfg = read_config(directory)
        # the cache is sized from the config here (fp32 K and V), generously: the model reports
        # its real page size once loaded
        per_token = cfg.layers * 2 * cfg.kv_heads * cfg.head_dim * 4
        self.model = Qwen3Model(directory, precision, cache_bytes=per_token * cache_tokens)
        self.model.compile()  # what a node serves: phextcc's SIW programs on a sentron
        stats = self.model.cache_stats()
        self.kv_bytes_per_token = stats["bytes_per_page"] // stats["page_tokens"]
        self.name = f"vtpu {precision}"
        self.precision = precision
        self.weight_bytes = self.model.nbytes

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, list[int]]:
        seqs, first = [], []
        for prompt in prompts:
            seq = self.model.new_sequence()
            seqs.append(seq)
            first.append(int(np.argmax(self.model.prefill(seq, prompt))))
        return seqs, first

    def step(self, state: Any, tokens: list[int]) -> list[int]:
        return [int(t) for t in np.argmax(self.model.decode(state, tokens), axis=1)]

    def logits_step(self, state: Any, token: int) -> np.ndarray:
        return np.asarray(self.model.decode(state, [token])[0], np.float32)

    def prefill_logits(self, prompt: list[int]) -> tuple[Any, np.ndarray]:
        seq = self.model.new_sequence()
        return [seq], np.asarray(self.model.prefill(seq, prompt), np.float32)

    def release(self, state: Any) -> None:
        for seq in state:
            self.model.free(seq)


class Transformers(Contender):
    def __init__(self, directory: Path, precision: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress line is on stderr
        hf_logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        self.name = f"transformers {precision}"
        self.precision = precision
        # tied embeddings are one tensor: count each parameter once
        unique = {id(p): p for p in self.model.parameters()}
        self.weight_bytes = sum(p.numel() * p.element_size() for p in unique.values())
        cfg = self.model.config
        item = torch.finfo(dtype).bits // 8
        self.kv_bytes_per_token = (
            cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * item
        )

    def _forward(self, ids: Any, past: Any) -> tuple[Any, Any]:
        # logits_to_keep=1: the lm_head for the last position only, as generate() does
        out = self.model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.cache

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, list[int]]:
        with self.torch.inference_mode():
            logits, past = self._forward(self.torch.tensor(prompts), None)
        return [past], logits.argmax(-1).tolist()

    def step(self, state: Any, tokens: list[int]) -> list[int]:
        with self.torch.inference_mode():
            logits, state[0] = self._forward(self.torch.tensor(tokens)[:, None], state[0])
        return logits.argmax(-1).tolist()

    def logits_step(self, state: Any, token: int) -> np.ndarray:
        with self.torch.inference_mode():
            logits, state[0] = self._forward(self.torch.tensor([[token]]), state[0])
        return logits[0].numpy()

    def prefill_logits(self, prompt: list[int]) -> tuple[Any, np.ndarray]:
        with self.torch.inference_mode():
            logits, past = self._forward(self.torch.tensor([prompt]), None)
        return [past], logits[0].numpy()


# ---- llama.cpp --------------------------------------------------------------------------------

LLAMA_CPP_TYPES = ("F32", "F16", "Q8_0")
LLAMA_CPP_MISSING = "llama.cpp: not installed (pip install llama-cpp-python builds it from source)"


def llama_cpp_available() -> str | None:
    """None when llama_cpp and gguf import, else the reason."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        name = getattr(exc, "name", "") or ""
        if name.startswith("gguf"):
            return "llama.cpp: the gguf package is not installed (pip install gguf)"
        return LLAMA_CPP_MISSING
    return None


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(directory: Path, out: Path, qtype: str) -> Path:
    """The safetensors of `directory` as a GGUF file of type F32, F16 or Q8_0, with the gguf
    package's writer and quantiser (as llama.cpp's convert_hf_to_gguf.py names Qwen3's tensors).
    Norm weights stay F32, as the converter keeps them."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((directory / "config.json").read_text())
    rope = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta"))
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(str(path))
    writer = gguf.GGUFWriter(str(out), "qwen3")
    writer.add_name("qwen3-random")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[qtype])
    # llama.cpp sizes the embedding from the vocabulary, and its "none" vocabulary has no
    # tokens: a placeholder SentencePiece vocabulary of the right size (the benchmark feeds
    # token ids, so no text is ever tokenized)
    vocab = cfg["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_bos_token_id(int(cfg.get("bos_token_id") or 0))
    writer.add_eos_token_id(int(cfg.get("eos_token_id") or 0))
    writer.add_add_bos_token(False)
    quant = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]  # fmt: skip
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        if name == "model.embed_tokens.weight":
            new = "token_embd.weight"
        elif name == "model.norm.weight":
            new = "output_norm.weight"
        elif name == "lm_head.weight":
            new = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            new = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        kind = quant if value.ndim == 2 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.F16:
            data = value.astype(np.float16)
        elif kind == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.quantize(value, kind)
        else:
            data = value
        writer.add_tensor(new, data, raw_dtype=kind if kind == quant else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class LlamaCpp(Contender):
    """llama.cpp through llama-cpp-python, one sequence (its high-level API has one KV stream)."""

    def __init__(self, path: Path, qtype: str, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=PREFILL_TOKENS, n_threads=threads,
            n_threads_batch=threads, logits_all=False, verbose=False,
        )  # fmt: skip
        self.vocab = self.llm.n_vocab()
        self.name = f"llama.cpp {qtype}"
        self.precision = qtype
        self.weight_bytes = path.stat().st_size
        meta = self.llm.metadata
        layers = int(meta.get("qwen3.block_count", 0))
        kvh = int(meta.get("qwen3.attention.head_count_kv", 0))
        d = int(meta.get("qwen3.attention.key_length", 0))
        self.kv_bytes_per_token = layers * 2 * kvh * d * 2  # llama.cpp's default cache is F16

    def _last_logits(self) -> np.ndarray:
        # without logits_all, llama-cpp-python keeps no scores: read the context's last row
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).astype(np.float32)

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, list[int]]:
        if len(prompts) != 1:
            raise BenchError("llama.cpp is timed on one sequence")
        self.llm.reset()
        self.llm.eval(prompts[0])
        return None, [int(np.argmax(self._last_logits()))]

    def step(self, state: Any, tokens: list[int]) -> list[int]:
        self.llm.eval(tokens)
        return [int(np.argmax(self._last_logits()))]

    def logits_step(self, state: Any, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_logits()

    def prefill_logits(self, prompt: list[int]) -> tuple[Any, np.ndarray]:
        self.llm.reset()
        self.llm.eval(prompt)
        return None, self._last_logits()


# ---- measurements -------------------------------------------------------------------------------


# numpy's float32 sum is compute-bound on these machines (~14 GB/s from L2 on Zen 4), so it
# would understate the bandwidth and flatter every fraction of the limit; max and a float64 sum
# stream faster. The best reader's figure is used: the highest bandwidth shown is the limit.
READERS: dict[str, Callable[[np.ndarray], Any]] = {
    "max": np.max,
    "sum": lambda part: part.view(np.float64).sum(),
}


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` read bandwidth of numpy reductions (max; sum of the bytes as float64)
    over a `gib` GiB array, on 1 thread and on `threads` Python threads each reducing its own
    slice (numpy releases the GIL inside a reduction). Bytes/s = array bytes / wall time until
    the last thread is done."""
    n = int(gib * 2**30) // 8 * 2
    a = np.ones(n, np.float32)  # written, so every page is resident before timing
    out: dict[str, Any] = {"bytes": a.nbytes, "method": (
        f"numpy max / float64 sum over a {a.nbytes / 2**30:.2g} GiB array, best of {repeats}; "
        "N threads: N Python threads each reducing 1/N of it")}  # fmt: skip
    for count in sorted({1, threads}):
        slices = np.array_split(a, count)
        for name, reader in READERS.items():
            best = math.inf
            for _ in range(repeats):
                barrier = threading.Barrier(count + 1)

                def work(part: np.ndarray, barrier: threading.Barrier = barrier,
                         reader: Callable = reader) -> None:  # fmt: skip
                    barrier.wait()
                    reader(part)

                workers = [threading.Thread(target=work, args=(s,)) for s in slices]
                for t in workers:
                    t.start()
                t0 = time.perf_counter()
                barrier.wait()
                for t in workers:
                    t.join()
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_gb_per_s_{count}t"] = a.nbytes / best / 1e9
        out[f"gb_per_s_{count}t"] = max(out[f"{r}_gb_per_s_{count}t"] for r in READERS)
    out["gb_per_s"] = out[f"gb_per_s_{threads}t"]
    del a
    return out


def agreement(
    reference: Any, others: list[Any], prompt: list[int], steps: int, tick: Callable[[float], None]
) -> dict[str, dict[str, Any]]:
    """Top-1 match rate and max |logit difference| of each of `others` against `reference` over
    `steps` greedy steps of the reference (teacher-forced: every model sees the reference's
    tokens). Each entry of `others` is (contender, steps it takes; fewer for slow ones)."""
    state, logits = reference.prefill_logits(prompt)
    ref_rows, tokens = [logits], []
    for i in range(steps - 1):
        tokens.append(int(np.argmax(ref_rows[-1])))
        ref_rows.append(reference.logits_step(state, tokens[-1]))
        tick(0.4 * (i + 1) / steps)
    reference.release(state)
    spread = float(np.median([r.max() - np.sort(r)[-2] for r in ref_rows]))
    scale = float(max(np.abs(r).max() for r in ref_rows))
    out: dict[str, dict[str, Any]] = {}
    for index, (other, limit) in enumerate(others):
        count = min(limit, steps)
        state, logits = other.prefill_logits(prompt)
        match, err = 0, 0.0
        for i in range(count):
            if i:
                logits = other.logits_step(state, tokens[i - 1])
            match += int(np.argmax(logits) == np.argmax(ref_rows[i]))
            err = max(err, float(np.abs(logits - ref_rows[i]).max()))
        other.release(state)
        out[other.name] = {"steps": count, "top1_match": match / count, "max_abs_logit_err": err}
        tick(0.4 + 0.6 * (index + 1) / len(others))
    out["_reference"] = {"name": reference.name, "max_abs_logit": scale,
                         "median_top1_margin": spread, "tokens": tokens[:16]}  # fmt: skip
    return out


def _prompts(vocab: int, count: int, length: int, salt: int) -> list[list[int]]:
    rng = np.random.default_rng(SEED + salt)
    return rng.integers(0, vocab, (count, length)).tolist()


def measure(c: Contender, metric: str, vocab: int, decode_tokens: int, salt: int) -> float:
    """Seconds of one measurement: the timed part only (decode steps; a prefill; a TTFT)."""
    if metric in ("decode_b1", "decode_b4"):
        batch = 1 if metric == "decode_b1" else 4
        state, tokens = c.prefill(_prompts(vocab, batch, PROMPT_TOKENS, salt))
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tokens = c.step(state, tokens)
        seconds = time.perf_counter() - t0
    else:
        length = PREFILL_TOKENS if metric == "prefill" else PROMPT_TOKENS
        prompt = _prompts(vocab, 1, length, salt)
        t0 = time.perf_counter()
        state, _ = c.prefill(prompt)
        seconds = time.perf_counter() - t0
    c.release(state)
    return seconds


METRICS = ("decode_b1", "decode_b4", "prefill", "ttft")


def _tokens(metric: str, decode_tokens: int) -> int:
    return {"decode_b1": decode_tokens, "decode_b4": 4 * decode_tokens,
            "prefill": PREFILL_TOKENS, "ttft": 1}[metric]  # fmt: skip


def _child(args: argparse.Namespace) -> dict[str, Any]:
    from vtpu import kernels
    from vtpu.cpu import cpu_info

    threads, directory = args.child, Path(args.model_dir)
    shape = shape_of(args.shape, args.layers)
    vocab = shape["vocab"]
    progress = Progress()
    cpu = cpu_info()
    out: dict[str, Any] = {
        "threads": threads,
        "kernel_threads": kernels.num_threads(),
        "cpu": {"model": cpu.model_name, "family": cpu.family, "model_number": cpu.model,
                "logical_cpus": cpu.logical_cpus, "vector_path": cpu.vector_path},
        "kernel_isa": kernels.isa(),
        "shape": shape,
        "model_dir": str(directory),
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
    }  # fmt: skip
    from vtpu.kernels import packed

    # which matmul body each precision runs at decode (M = 1, 4) and prefill (M = 512) rows
    path = getattr(packed, "path", None)
    out["packed_paths"] = (
        {p: {m: path(p, m) for m in (1, 4, PREFILL_TOKENS)} for p in PRECISIONS} if path else None
    )

    progress.phase("bandwidth")
    out["bandwidth"] = read_bandwidth(threads, gib=args.bandwidth_gib)
    progress.done(f"{out['bandwidth']['gb_per_s']:.1f} GB/s on {threads} thread(s)")

    progress.phase("loading")
    cache_tokens = max(PREFILL_TOKENS, 4 * (PROMPT_TOKENS + args.decode_tokens),
                       PROMPT_TOKENS + args.agree_steps) + 64  # fmt: skip
    contenders: list[Contender] = []
    for i, p in enumerate(PRECISIONS):
        contenders.append(Ours(directory, p, cache_tokens))
        progress.tick((i + 1) / 6)
    reference_note = None
    try:
        for p in ("fp32", "bf16"):
            contenders.append(Transformers(directory, p, threads))
        progress.tick(5 / 6)
    except ImportError as exc:
        reference_note = f"transformers not installed ({exc}): ours only"
    llama_note = llama_cpp_available()
    if llama_note is None and not args.no_llama_cpp:
        gguf_dir = directory / "gguf"
        gguf_dir.mkdir(exist_ok=True)
        for qtype in LLAMA_CPP_TYPES:
            path = gguf_dir / f"model-{qtype}.gguf"
            if not path.exists():
                write_gguf(directory, path.with_suffix(".partial"), qtype).rename(path)
            contenders.append(LlamaCpp(path, qtype, threads, cache_tokens))
    elif args.no_llama_cpp:
        llama_note = "llama.cpp: skipped (--no-llama-cpp)"
    out["llama_cpp"] = llama_note
    out["reference_note"] = reference_note
    progress.done(", ".join(c.name for c in contenders))

    progress.phase("agreement")
    fp32 = contenders[0]
    others = [(c, args.agree_steps) for c in contenders[1:3]]
    others += [(c, min(args.agree_steps, args.agree_steps_reference)) for c in contenders[3:]]
    agree = agreement(fp32, others, _prompts(vocab, 1, PROMPT_TOKENS, 7)[0], args.agree_steps,
                      progress.tick)  # fmt: skip
    out["agreement"] = agree
    progress.done(
        ", ".join(f"{k} {v['top1_match']:.0%}" for k, v in agree.items() if k != "_reference")
    )

    progress.phase("timing")
    times: dict[str, dict[str, list[float]]] = {c.name: {m: [] for m in METRICS}
                                                for c in contenders}  # fmt: skip
    for c in contenders:  # warm-up: first calls allocate and fault pages in
        measure(c, "decode_b1", vocab, 2, 99)
    for r in range(args.repeats):
        for m_index, metric in enumerate(METRICS):
            shift = (r + m_index) % len(contenders)  # nobody always first
            for c in contenders[shift:] + contenders[:shift]:
                if metric == "decode_b4" and isinstance(c, LlamaCpp):
                    continue
                times[c.name][metric].append(measure(c, metric, vocab, args.decode_tokens, r))
            progress.tick((r * len(METRICS) + m_index + 1) / (args.repeats * len(METRICS)))
    progress.done(f"{args.repeats} rounds")

    # again after the timing: other tenants come and go, and the best figure is the limit
    progress.phase("bandwidth")
    again = read_bandwidth(threads, gib=args.bandwidth_gib)
    first = out["bandwidth"]
    for key, value in again.items():
        if "gb_per_s" in key:
            first[key] = max(first[key], value)
    first["method"] += ", at the start and at the end of the run"
    progress.done(f"{first['gb_per_s']:.1f} GB/s on {threads} thread(s), best of both")
    bw = first["gb_per_s"] * 1e9
    mean_context = PROMPT_TOKENS + (args.decode_tokens + 1) / 2
    base = next((c.name for c in contenders if c.name == "transformers fp32"), None)
    rows = {}
    for c in contenders:
        t = times[c.name]
        row: dict[str, Any] = {"weight_bytes": c.weight_bytes,
                               "kv_bytes_per_token": c.kv_bytes_per_token}  # fmt: skip
        for metric in METRICS:
            if not t[metric]:
                continue
            med = statistics.median(t[metric])
            n = _tokens(metric, args.decode_tokens)
            row[metric] = {"seconds": t[metric], "median_s": med, "tokens_per_s": n / med}
            if base and c.name != base and times[base][metric]:
                # per round: transformers fp32's time / this one's (same round, same prompt)
                row[metric]["vs_" + base.replace(" ", "_")] = statistics.median(
                    b / o for b, o in zip(times[base][metric], t[metric], strict=True)
                )
        for metric, batch in (("decode_b1", 1), ("decode_b4", 4)):
            if metric in row:
                step_bytes = c.weight_bytes + batch * c.kv_bytes_per_token * mean_context
                limit = batch * bw / step_bytes
                row[metric].update(step_bytes=step_bytes, limit_tokens_per_s=limit,
                                   fraction_of_limit=row[metric]["tokens_per_s"] / limit)  # fmt: skip
        if "decode_b1" in row and "decode_b4" in row:
            row["b4_vs_b1"] = statistics.median(
                (4 * b1) / b4 for b1, b4 in zip(t["decode_b1"], t["decode_b4"], strict=True)
            )
        rows[c.name] = row
    out["results"] = rows
    out["baseline"] = base
    out["mean_context"] = mean_context
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


class Progress:
    """Phases of the child on stderr: a redrawn line on a terminal, one line per phase else."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.name, self.t0, self.last = "", time.monotonic(), 0.0

    def phase(self, name: str) -> None:
        self.name, self.t0 = name, time.monotonic()
        self.tick(0.0)

    def tick(self, fraction: float) -> None:
        now = time.monotonic()
        if not self.live or (now - self.last < 0.2 and 0 < fraction < 1):
            return
        self.last = now
        sys.stderr.write(f"\r  {self.name:<10} {fraction:4.0%}  {now - self.t0:5.0f} s")
        sys.stderr.flush()

    def done(self, summary: str) -> None:
        text = f"  {self.name:<10} done in {time.monotonic() - self.t0:.0f} s: {summary}"
        sys.stderr.write(("\r" + text.ljust(40) if self.live else text) + "\n")
        sys.stderr.flush()


# ---- the parent: model on disk, one child per thread count, the table ---------------------------


def _run_child(threads: int, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("VTPU_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    argv = [sys.executable, "-m", "vtpu.bench.llm", "--child", str(threads),
            "--model-dir", str(args.model_dir), "--shape", args.shape,
            "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens),
            "--agree-steps", str(args.agree_steps),
            "--agree-steps-reference", str(args.agree_steps_reference),
            "--bandwidth-gib", str(args.bandwidth_gib)]  # fmt: skip
    if args.layers is not None:
        argv += ["--layers", str(args.layers)]
    if args.no_llama_cpp:
        argv.append("--no-llama-cpp")
    # progress goes straight to our stderr; the result is the last line of stdout
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"the {threads}-thread run failed (exit {proc.returncode}); see above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def _get(row: dict, metric: str, field: str) -> float | None:
    return row.get(metric, {}).get(field)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _pct(fraction: float | None, width: int) -> str:
    return f"{100 * fraction:{width - 1}.0f}%" if fraction is not None else f"{'-':>{width}}"


def format_table(runs: list[dict[str, Any]]) -> str:
    first = runs[0]
    cpu, shape = first["cpu"], first["shape"]
    params = (shape["vocab"] * shape["hidden"] * (1 if shape["tie"] else 2)
              + shape["layers"] * (shape["hidden"] * shape["head_dim"] *
                                   (2 * shape["heads"] + 2 * shape["kv_heads"])
                                   + 3 * shape["hidden"] * shape["intermediate"]))  # fmt: skip
    lines = [
        f"Qwen3 random model, {shape['layers']} layers, hidden {shape['hidden']}, "
        f"{shape['heads']}/{shape['kv_heads']} heads x {shape['head_dim']}, vocab "
        f"{shape['vocab']}, tied: {params / 1e6:.0f} M parameters ({first['model_dir']})",
        f"CPU: {cpu['model']} (family {cpu['family']} model {cpu['model_number']}, "
        f"{cpu['logical_cpus']} CPUs, widest ISA {cpu['vector_path']}); kernels: "
        f"{first['kernel_isa']}",
    ]
    for precision, paths in (first.get("packed_paths") or {}).items():
        by_path: dict[str, list[str]] = {}
        for m, text in paths.items():
            by_path.setdefault(text, []).append(str(m))
        lines.append(
            f"  {precision} matmul: "
            + "; ".join(f"M={','.join(ms)}: {text}" for text, ms in by_path.items())
        )
    for run in runs:
        bw = run["bandwidth"]
        base = run["baseline"]
        lines.append("")
        lines.append(
            f"{run['threads']} thread(s): read bandwidth "
            + ", ".join(
                f"{bw[k]:.1f} GB/s on {k[9:-1]} thread(s)" for k in bw if k.startswith("gb_per_s_")
            )  # fmt: skip
            + f"\n  ({bw['method']});\n  decode: {run['decode_tokens']} steps after a "
            f"{PROMPT_TOKENS}-token prompt; {run['repeats']} interleaved rounds"
        )
        key = "vs_" + (base or "").replace(" ", "_")
        agree = run["agreement"]
        # (heading, second heading line, width, the cell of one row)
        columns: list[tuple[str, str, int, Callable[[dict, dict], str]]] = [
            ("weights", "MB", 9, lambda r, a: _fmt(r["weight_bytes"] / 1e6, ".1f", 9)),
            ("decode", "b1 tok/s", 10, lambda r, a: _fmt(_get(r, "decode_b1", "tokens_per_s"), ".2f", 10)),
            ("of", "limit", 7, lambda r, a: _pct(_get(r, "decode_b1", "fraction_of_limit"), 7)),
            ("decode", "b4 tok/s", 10, lambda r, a: _fmt(_get(r, "decode_b4", "tokens_per_s"), ".2f", 10)),
            ("of", "limit", 7, lambda r, a: _pct(_get(r, "decode_b4", "fraction_of_limit"), 7)),
            ("b4/b1", "", 7, lambda r, a: _fmt(r.get("b4_vs_b1"), ".2f", 7)),
            ("prefill", "tok/s", 9, lambda r, a: _fmt(_get(r, "prefill", "tokens_per_s"), ".1f", 9)),
            ("TTFT", "ms", 8, lambda r, a: _fmt(_ms(_get(r, "ttft", "median_s")), ".1f", 8)),
            ("b1", "vs tf32", 8, lambda r, a, k=key: _fmt(_get(r, "decode_b1", k), ".2f", 8)),
            ("b4", "vs tf32", 8, lambda r, a, k=key: _fmt(_get(r, "decode_b4", k), ".2f", 8)),
            ("prefill", "vs tf32", 8, lambda r, a, k=key: _fmt(_get(r, "prefill", k), ".2f", 8)),
            ("top-1", "match", 7, lambda r, a: _pct(a.get("top1_match"), 7)),
            ("max", "|dlogit|", 10, lambda r, a: _fmt(a.get("max_abs_logit_err"), ".3g", 10)),
        ]  # fmt: skip
        lines.append(f"{'engine':<18}" + "".join(f"{c[0]:>{c[2]}}" for c in columns))
        lines.append(f"{'':<18}" + "".join(f"{c[1]:>{c[2]}}" for c in columns))
        for name, row in run["results"].items():
            a = agree.get(name, {"top1_match": 1.0, "max_abs_logit_err": 0.0})
            cells = "".join(c[3](row, a) for c in columns)
            if name == agree["_reference"]["name"]:  # the reference's own agreement cells
                cells = cells[:-17] + f"{'ref':>7}{'ref':>10}"
            lines.append(f"{name:<18}{cells}")
        ref = agree["_reference"]
        lines.append(
            f"limit: (resident weights + KV cache at {run['mean_context']:.1f} tokens x batch) "
            f"read once per step at {bw['gb_per_s']:.1f} GB/s; 'of limit': decode tokens/s as "
            "a share of that limit. b4/b1: batch-4 tokens/s over batch-1, median per round."
        )
        lines.append(
            f"vs tf32: median per-round ratio of {base or 'transformers fp32'}'s time to this "
            "one's (>1: faster). TTFT: prefill of the 32-token prompt + argmax."
        )
        steps = {v["steps"] for k, v in agree.items() if k != "_reference"}
        lines.append(
            f"agreement with {ref['name']} over {'/'.join(str(s) for s in sorted(steps))} greedy "
            f"steps (teacher-forced): top-1 match rate, max |logit - ref logit|; ref |logit| <= "
            f"{ref['max_abs_logit']:.3g}, median top-1 margin {ref['median_top1_margin']:.3g}"
        )
        lines.append(run["llama_cpp"] or "llama.cpp: timed above (GGUF F32/F16/Q8_0, batch 1)")
        if run.get("reference_note"):
            lines.append(run["reference_note"])
        lines.append(f"peak RSS of this run (all engines loaded): "
                     f"{run['peak_rss_bytes'] / 2**30:.1f} GiB")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtpu bench-llm", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="2", help="thread counts, comma-separated (2)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b",
                        help="model shape: 0.6b (Qwen3-0.6B, default) or tiny (tests)")  # fmt: skip
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--model-dir", help="where the random model is written and reused "
                        "(default ~/.cache/vtpu/qwen3-0.6b-random)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--decode-tokens", type=int, default=16,
                        help="timed decode steps per measurement (16)")  # fmt: skip
    parser.add_argument("--agree-steps", type=int, default=256,
                        help="greedy steps compared for bf16/int8 agreement (256)")  # fmt: skip
    parser.add_argument("--agree-steps-reference", type=int, default=48,
                        help="of those, steps compared for transformers/llama.cpp (48)")  # fmt: skip
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("repeats", "decode_tokens", "agree_steps", "agree_steps_reference"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.bandwidth_gib <= 0:
        parser.error("--bandwidth-gib must be positive")
    if args.model_dir is None:
        args.model_dir = str(default_model_dir(args.shape, args.layers))
    try:
        if args.child:
            print(json.dumps(_child(args)))
            return 0
        counts = thread_counts(parser, args.threads)
        shape = shape_of(args.shape, args.layers)
        note = ensure_model(Path(args.model_dir).expanduser(), shape,
                            lambda m: print(m, file=sys.stderr))  # fmt: skip
        print(f"model {args.model_dir}: {note}", file=sys.stderr)
        runs = []
        for t in counts:
            print(f"{t} thread(s):", file=sys.stderr)
            runs.append(_run_child(t, args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(runs, indent=2) if args.json else format_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
