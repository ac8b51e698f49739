"""The one input binder: a program's inputs, given as JSON (the agent) or as arrays (`vtpu run`),
checked and converted to the arrays the program declares; and outputs back to JSON.

Every mistake is an InputError naming the input, raised before a sentron is taken."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# JSON dtype names accepted for program inputs, and the name each output dtype is reported as.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "float32": np.dtype(np.float32),
    "i32": np.dtype(np.int32),
    "int32": np.dtype(np.int32),
    "i8": np.dtype(np.int8),
    "int8": np.dtype(np.int8),
    "i64": np.dtype(np.int64),
    "int64": np.dtype(np.int64),
}
DTYPE_NAMES = {
    np.dtype(np.float32): "f32",
    np.dtype(np.int32): "i32",
    np.dtype(np.int8): "i8",
    np.dtype(np.int64): "i64",
}


class InputError(ValueError):
    """A program input the caller sent is unusable; `status` is 400, or 413 for too large."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def tensor_from_json(name: str, spec: Any, dtype: np.dtype) -> np.ndarray:
    """One input, given as {"shape", "dtype", "data": flat list} or as nested lists, converted to
    the dtype the program declared; values the dtype cannot hold are refused, never wrapped."""
    shape = None
    if isinstance(spec, dict):
        unknown = set(spec) - {"shape", "dtype", "data"}
        if unknown:
            raise InputError(f"input {name!r}: unknown keys {sorted(unknown)}")
        given = spec.get("dtype")
        if given is not None:
            if not isinstance(given, str) or given not in DTYPES:
                valid = ", ".join(sorted(set(DTYPE_NAMES.values())))
                raise InputError(f"input {name!r}: dtype {given!r} is not one of {valid}")
            if DTYPES[given] != dtype:
                raise InputError(
                    f"input {name!r}: dtype {given} given, the program declares "
                    f"{DTYPE_NAMES[dtype]}"
                )
        data = spec.get("data")
        if not isinstance(data, list):
            raise InputError(f"input {name!r}: 'data' must be a list of numbers")
        shape = spec.get("shape")
        if shape is not None and not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InputError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    elif isinstance(spec, list):
        data = spec
    else:
        raise InputError(f"input {name!r}: give nested lists or an object {{shape, dtype, data}}")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "iuf":
        raise InputError(f"input {name!r}: data must be numbers, nested regularly (rectangular)")
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            converted = array.astype(dtype)
        if (np.isinf(converted) & ~np.isinf(array)).any():
            raise InputError(f"input {name!r}: a value is out of the range of {DTYPE_NAMES[dtype]}")
    else:
        info = np.iinfo(dtype)
        if array.size and (
            (
                array.dtype.kind == "f"
                and not (np.isfinite(array) & (array == np.trunc(array))).all()
            )
            or array.min() < info.min
            or array.max() > info.max
        ):
            raise InputError(
                f"input {name!r}: {DTYPE_NAMES[dtype]} data must be integers in "
                f"[{info.min}, {info.max}]"
            )
        converted = array.astype(dtype)
    if shape is not None:
        if array.ndim != 1:
            raise InputError(f"input {name!r}: with 'shape' given, 'data' must be a flat list")
        if array.size != math.prod(shape):
            raise InputError(f"input {name!r}: {array.size} values do not fill shape {shape}")
        converted = converted.reshape(shape)
    return np.ascontiguousarray(converted)


def tensor_to_json(array: np.ndarray) -> dict[str, Any]:
    """{"shape", "dtype", "data": flat list}. JSON has no NaN or infinity, so such values are
    null in `data`, and "nonfinite" counts them: a client can tell an overflow from a value."""
    array = np.asarray(array)
    name = DTYPE_NAMES.get(array.dtype, str(array.dtype))
    doc: dict[str, Any] = {"shape": list(array.shape), "dtype": name}
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        flat = array.ravel()
        bad = ~np.isfinite(flat)
        doc["data"] = [None if b else v for v, b in zip(flat.tolist(), bad.tolist(), strict=True)]
        doc["nonfinite"] = int(bad.sum())
    else:
        doc["data"] = array.ravel().tolist()
    return doc


def run_stats(result: Any) -> dict[str, Any]:
    """A RunResult's figures (words issued, loops, per-pipe busy ns, wall/setup ns, ops)."""
    return {
        f.name: getattr(result, f.name)
        for f in dataclasses.fields(result)
        if f.name not in ("outputs", "intervals")
    }


def bind_inputs(program: Any, inputs: Any) -> dict[str, np.ndarray]:
    """Inputs -> arrays matching the program's `input` tensors by name, shape and dtype.

    Each input is JSON (nested lists or {shape, dtype, data}) or a numpy array; an array is cast
    when that keeps its kind (np.save writes float64, the program wants f32)."""
    from vtpu import siw

    declared = {t.name: t for t in program.tensors if t.init == "input"}
    if inputs is None:
        inputs = {}
    if not isinstance(inputs, dict):
        raise InputError("'inputs' must be an object mapping input names to tensors")
    unknown = [n for n in inputs if n not in declared]
    if unknown:
        raise InputError(
            f"unknown input(s) {', '.join(map(repr, unknown))}; the program's inputs are: "
            f"{', '.join(declared) or '(none)'}"
        )
    missing = [t for n, t in declared.items() if n not in inputs]
    if missing:
        shown = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in missing)
        raise InputError(f"missing input(s): {shown}")
    arrays = {}
    for name, spec in declared.items():
        want = np.dtype(siw.NUMPY_DTYPES[spec.dtype])
        given = inputs[name]
        if isinstance(given, np.ndarray):
            if given.dtype != want and not np.can_cast(given.dtype, want, "same_kind"):
                raise InputError(
                    f"input {name!r} is {given.dtype}; the program declares {spec.dtype}"
                )
            array = np.ascontiguousarray(given, dtype=want)
        else:
            array = tensor_from_json(name, given, want)
        if tuple(array.shape) != tuple(spec.shape):
            raise InputError(
                f"input {name!r} has shape {list(array.shape)}; the program declares "
                f"{list(spec.shape)}"
            )
        arrays[name] = array
    return arrays


# Characters one element takes in the answer's JSON at most, with its ", " separator:
# a float32 as a Python float repr ("-1.2345678901234567e-30"), integers by their widest value.
JSON_CHARS_PER_ELEMENT = {"f32": 26, "i32": 13, "i8": 6, "i64": 22}


def output_json_bytes(program: Any) -> int:
    """An upper estimate of the JSON size of a program's outputs, from their declared shapes."""
    total = 0
    for t in program.tensors:
        if t.output:
            total += 64 + math.prod(t.shape) * JSON_CHARS_PER_ELEMENT.get(t.dtype, 26)
    return total
