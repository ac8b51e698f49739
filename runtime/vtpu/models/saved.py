"""Model loads that outlive the agent: the loaded models are saved in agent.json and loaded
again when the agent starts, so a restarted agent (a node after a reboot, through its service)
serves what it served before.

Every successful load — POST /vTPU/models, the control plane's load_model action, `--load-model`
— and every unload rewrites agent.json's "models" with the loaded set, [{"name", "precision"}]
(node_state.SAVED_MODELS_KEY). At start, after the `--load-model` models, `load_saved()` loads
the saved ones not loaded yet; one that cannot be loaded any more (its package removed, the
budget lowered, a --model-dir no longer given) is logged and left out, so agent.json always
names what is loaded. An unload is the way to stop a model coming back.

Contract: docs/architecture.md, "Resident models and embeddings".
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from vtpu.models import LoadedModel, ModelError, ModelRegistry
from vtpu.node_state import (
    SAVED_MODELS_KEY,
    ConfigError,
    load_saved_config,
    update_saved_config,
)

log = logging.getLogger("vtpu.agent")


class SavedModelRegistry(ModelRegistry):
    """A ModelRegistry whose loaded set is kept in STATE_DIR/agent.json."""

    def __init__(self, state_dir: Path, **options: Any) -> None:
        super().__init__(**options)
        self.state_dir = state_dir
        self._save_lock = threading.Lock()

    def load(self, name: str, precision: str = "fp32") -> LoadedModel:
        model = super().load(name, precision)
        self._save()
        return model

    def unload(self, name: str) -> LoadedModel:
        model = super().unload(name)
        self._save()
        return model

    def _save(self) -> None:
        # under one lock, so two loads finishing at once write in order and the last write
        # holds both
        with self._save_lock:
            models = [{"name": n, "precision": p} for n, p in self.loaded()]
            update_saved_config(self.state_dir, **{SAVED_MODELS_KEY: models})

    def saved(self) -> list[tuple[str, str]]:
        """(name, precision) saved in agent.json; malformed entries are logged and skipped."""
        try:
            entries = load_saved_config(self.state_dir).get(SAVED_MODELS_KEY) or []
        except ConfigError as exc:
            log.warning("no saved models loaded: %s", exc)
            return []
        if not isinstance(entries, list):
            log.warning("ignoring agent.json's %r: not a list", SAVED_MODELS_KEY)
            return []
        out = []
        for entry in entries:
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("precision", "fp32"), str)
            ):
                out.append((entry["name"], entry.get("precision", "fp32")))
            else:
                log.warning("ignoring agent.json's saved model %r: not {name, precision}", entry)
        return out

    def load_saved(self) -> list[str]:
        """Load the saved models not loaded yet; returns the names that could not be loaded."""
        already = {n for n, _ in self.loaded()}
        failed = []
        for name, precision in self.saved():
            if name in already:  # --load-model named it: the command line decides its precision
                continue
            try:
                model = super().load(name, precision)
            except ModelError as exc:
                log.warning(
                    "model %s (%s) saved in agent.json was not loaded: %s; it is left out",
                    name,
                    precision,
                    exc,
                )
                failed.append(name)
                continue
            log.info("model %s loaded in %s again (%d bytes)", model.name, precision, model.bytes)
        self._save()
        return failed
