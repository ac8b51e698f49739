"""The one JSON encoder of the node: agent answers, heartbeats, `vtpu run --json`, `vtpu bench
--json`. Strict JSON: numpy scalars and arrays become numbers and lists, NaN and infinity become
null (JSON has neither), paths become strings and dataclasses objects."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def finite(value: Any) -> Any:
    """value with every non-finite float (and numpy scalar) replaced by None, recursively."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text; the fast path first, the NaN-scrubbing one only when needed."""
    try:
        return json.dumps(value, default=_default, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(finite(value), default=_default, allow_nan=False, **kwargs)
