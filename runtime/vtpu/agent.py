"""The node agent: the vTPU's HTTP service, polled by the control plane.

Standard library only (`http.server`), because a node gets the runtime wheel and nothing else.
Every endpoint but `GET /vTPU/health` wants `Authorization: Bearer <token>`; the token is stored
as a SHA-256 hash in the state dir, compared in constant time and never logged. Bad input gets a
4xx with a JSON reason and the service keeps running; a bug in a handler is a 500, counted in the
node's `errors` counter, with the traceback in the agent's log, not in the answer.

Contract: DESIGN.md, "Node agent contract".
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import secrets
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

import vtpu
from vtpu.counters import COUNTERS

log = logging.getLogger("vtpu.agent")

MiB = 1024 * 1024
CONFIG_FILE = "agent.json"
PID_FILE = "agent.pid"
COUNTERS_FILE = "counters"
SUSPENDED_FILE = "suspended"  # present while the control plane has the node suspended
# Seconds a client may take to send a whole request body, whatever its pace: the socket timeout
# alone lets a client that trickles one byte per timeout hold a thread for ever.
BODY_READ_SECONDS = 60.0
# Seconds in-flight requests get to finish after SIGTERM before their runs are aborted.
SHUTDOWN_GRACE_SECONDS = 5.0

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


def default_state_dir() -> Path:
    """$VTPU_STATE_DIR, else ~/.local/state/vtpu (XDG's place for state that outlives a run)."""
    env = os.environ.get("VTPU_STATE_DIR")
    return Path(env) if env else Path.home() / ".local" / "state" / "vtpu"


@dataclasses.dataclass
class AgentConfig:
    """What an agent runs with; saved in agent.json (plus the token's hash) on every start."""

    host: str = "127.0.0.1"
    port: int = 8470
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    tdp_watts: float = 125.0
    max_body_bytes: int = 16 * MiB
    max_run_seconds: float = 30.0
    max_tensor_elements: int = 16 * MiB  # per tensor: 64 MiB of f32
    max_arena_bytes: int = 256 * MiB  # all of one program's tensors together
    socket_timeout: float = 10.0
    max_connections: int = 64
    workers: int = 0  # sentrons in the pool; 0 = one per core
    # The control channel (vtpu.heartbeat): heartbeats start when both are set.
    control_plane: str | None = None
    node_id: str | None = None
    heartbeat_seconds: float = 15.0
    public_url: str | None = None  # the agent_url reported; default http://host:port
    token_file: str | None = None  # the node token in clear (0600), needed for heartbeats

    # Fields persisted in agent.json; state_dir is where the file is, so it is not among them.
    PERSISTED = (
        "host",
        "port",
        "tdp_watts",
        "max_body_bytes",
        "max_run_seconds",
        "max_tensor_elements",
        "max_arena_bytes",
        "socket_timeout",
        "max_connections",
        "workers",
        "control_plane",
        "node_id",
        "heartbeat_seconds",
        "public_url",
        "token_file",
    )


class ConfigError(Exception):
    """The agent cannot start with this configuration; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# State dir and token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically (no half-written config on a crash)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def load_saved_config(state_dir: Path) -> dict[str, Any]:
    path = state_dir / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; fix or remove it") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} must hold a JSON object; fix or remove it")
    return saved


def ensure_state_dir(state_dir: Path) -> None:
    """The state dir holds the token hash and the node's counters: owner-only (0700)."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
        os.chmod(state_dir, 0o700)  # whatever the umask
    elif stat.S_IMODE(state_dir.stat().st_mode) & 0o077:
        log.warning("state dir %s is readable by others; chmod 700 it", state_dir)


def resolve_token(
    saved: dict[str, Any], *, rotate_token: bool = False, env_token: str | None = None
) -> tuple[str, str | None]:
    """(token hash, new token to show once or None).

    VTPU_TOKEN (env_token) sets the token explicitly, as provisioning does; --rotate-token or a
    state dir without a token makes a new one; otherwise the stored hash is kept. The token
    itself is never written anywhere."""
    if env_token is not None:
        if len(env_token) < 16:
            raise ConfigError("VTPU_TOKEN is too short: use at least 16 characters")
        return hash_token(env_token), None
    if rotate_token or not saved.get("token_sha256"):
        token = secrets.token_urlsafe(32)
        return hash_token(token), token
    return str(saved["token_sha256"]), None


def save_config(config: AgentConfig, token_hash: str) -> None:
    record: dict[str, Any] = {name: getattr(config, name) for name in AgentConfig.PERSISTED}
    record["token_sha256"] = token_hash
    _write_private(config.state_dir / CONFIG_FILE, json.dumps(record, indent=2) + "\n")


def claim_pid_file(state_dir: Path) -> tuple[Path, int]:
    """Write agent.pid and hold an exclusive lock on it for the life of the process, so a second
    agent on the same state dir refuses to start (a stale file from a crash holds no lock).
    Returns the path and the open descriptor that keeps the lock."""
    import fcntl

    path = state_dir / PID_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"another agent (pid {other}) is running with state dir {state_dir}; "
            "stop it first or use another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return path, fd


# ---------------------------------------------------------------------------------------------
# Tensors in JSON


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
    """JSON inputs -> arrays matching the program's `input` tensors by name, shape and dtype.

    Checked here, before a sentron is taken, so every mistake is a 400 naming the input; the
    declared shapes were already held to the node's limits by validation, and the body size
    bounds what the JSON can hold."""
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
        array = tensor_from_json(name, inputs[name], np.dtype(siw.NUMPY_DTYPES[spec.dtype]))
        if tuple(array.shape) != tuple(spec.shape):
            raise InputError(
                f"input {name!r} has shape {list(array.shape)}; the program declares "
                f"{list(spec.shape)}"
            )
        arrays[name] = array
    return arrays


def check_arena(program: Any, max_bytes: int) -> None:
    """Refuse a program whose tensors together would not fit the node's per-program arena,
    before anything is allocated (scratch tensors count: they may all be alive at once)."""
    from vtpu.sentron import arena_bytes_for

    total = arena_bytes_for(program)
    if total > max_bytes:
        raise HTTPError(
            413,
            f"the program's tensors need {total} bytes; this node allows {max_bytes} per program",
        )


# ---------------------------------------------------------------------------------------------
# HTTP


class HTTPError(Exception):
    """Raised inside a handler to answer with `status` and a JSON body {"error": reason, ...}."""

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.extra = extra or {}
        self.headers = headers or {}


def _program_error(exc: Exception) -> HTTPError:
    """A rejected program as 400 {"error", "reason", "word", "line"}; word/line null when the
    fault is in the header or tensor table."""
    reason = getattr(exc, "reason", None) or "bad program"
    detail = getattr(exc, "detail", None)
    message = f"{reason}: {detail}" if detail else str(exc)
    extra = {
        "reason": reason,
        "word": getattr(exc, "index", None),
        "line": getattr(exc, "line", None),
    }
    return HTTPError(400, message, extra=extra)


class SentronPool:
    """A fixed set of sentrons; a request takes one or gets 503 (no queueing inside the agent:
    the caller decides whether to retry, and a flood cannot pile up threads here)."""

    def __init__(self, size: int, arena_bytes: int) -> None:
        self.size = size
        self.arena_bytes = arena_bytes
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for sentron_id in range(size):
            self._idle.put(self._new(sentron_id))
        self._runs: set[ProgramRun] = set()
        self._lock = threading.Lock()

    def _new(self, sentron_id: int) -> Any:
        from vtpu.arena import Arena
        from vtpu.sentron import Sentron

        # np.empty leaves the arena's pages untouched: an idle sentron costs address space only.
        return Sentron(Arena(self.arena_bytes), sentron_id=sentron_id)

    def start(self, program: Any, inputs: dict[str, np.ndarray]) -> ProgramRun | None:
        """Start a run on an idle sentron in its own thread; None when all are busy."""
        try:
            sentron = self._idle.get_nowait()
        except queue.Empty:
            return None
        run = ProgramRun(self, sentron, program, inputs)
        with self._lock:
            self._runs.add(run)
        run.thread.start()
        return run

    def finished(self, run: ProgramRun) -> None:
        """A run's thread ended: its sentron goes back to the pool."""
        with self._lock:
            self._runs.discard(run)
        self._idle.put(run.sentron)

    def cancel_all(self) -> None:
        with self._lock:
            runs = list(self._runs)
        for run in runs:
            run.cancel()


class ProgramRun:
    """One program on one sentron, in a thread of its own so the request can stop waiting.

    cancel() asks the sentron to stop before its next word (a kernel already running
    finishes first: kernels run nogil in C); the run then ends with RunCancelled."""

    def __init__(self, pool: SentronPool, sentron: Any, program: Any, inputs: dict) -> None:
        self.pool = pool
        self.sentron = sentron
        self.program = program
        self.inputs = inputs
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._work, name="vtpu-run", daemon=True)

    def _work(self) -> None:
        try:
            self.result = self.sentron.run(self.program, self.inputs)
        except Exception as exc:  # handed to the request thread
            self.error = exc
        self.pool.finished(self)
        self.done.set()

    def cancel(self) -> bool:
        """Stop the run at its next word; False when it had already ended."""
        if self.done.is_set():
            return False
        self.sentron.cancel()
        return True


class Agent:
    """The node agent: owns the server, the sentron pool, telemetry and the token hash."""

    def __init__(self, config: AgentConfig, token_hash: str) -> None:
        from vtpu.telemetry import Telemetry

        self.config = config
        self._token_hash = token_hash
        self.started = time.monotonic()
        COUNTERS.attach(config.state_dir / COUNTERS_FILE)
        self.telemetry = Telemetry(tdp_watts=config.tdp_watts)
        workers = config.workers or os.cpu_count() or 1
        self.pool = SentronPool(workers, config.max_arena_bytes)
        self.benchmark_lock = threading.Lock()
        self.heartbeat: Any = None  # a vtpu.heartbeat.HeartbeatClient once started
        # Kept across restarts: a node suspended for non-payment stays suspended until resumed.
        self._suspended = (config.state_dir / SUSPENDED_FILE).exists()
        self._active = 0
        self._active_lock = threading.Lock()
        self._stopping = threading.Event()
        handler = type("BoundHandler", (AgentHandler,), {"agent": self})
        handler.timeout = config.socket_timeout
        self.server = _Server((config.host, config.port), handler, self)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def check_token(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(hash_token(given.strip()), self._token_hash)

    @property
    def reported_url(self) -> str | None:
        """The agent_url told to the control plane: --public-url, else where it listens (None
        when it listens on every address: which one reaches it is not known here)."""
        if self.config.public_url:
            return self.config.public_url
        if self.config.host in ("0.0.0.0", "::", ""):
            return None
        return self.url

    @property
    def suspended(self) -> bool:
        return self._suspended

    def set_suspended(self, suspended: bool) -> None:
        if suspended == self._suspended:
            return
        marker = self.config.state_dir / SUSPENDED_FILE
        if suspended:
            _write_private(marker, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))
        else:
            marker.unlink(missing_ok=True)
        self._suspended = suspended
        log.warning(
            "suspended by the control plane: programs and benchmarks are refused"
            if suspended
            else "resumed by the control plane"
        )

    def _refuse_if_suspended(self) -> None:
        if self._suspended:
            from vtpu.heartbeat import SUSPENDED_MESSAGE

            raise HTTPError(503, SUSPENDED_MESSAGE)

    def request_started(self) -> None:
        with self._active_lock:
            self._active += 1

    def request_finished(self) -> None:
        with self._active_lock:
            self._active -= 1

    @property
    def active_requests(self) -> int:
        with self._active_lock:
            return self._active

    def serve(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop accepting, let runs finish (or abort them)."""

        def stop(signum: int, _frame: Any) -> None:
            if not self._stopping.is_set():
                self._stopping.set()
                name = signal.Signals(signum).name
                # shutdown() waits for serve_forever to return, so it cannot run on this thread.
                threading.Thread(target=self._shutdown, args=(name,), daemon=True).start()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.server.serve_forever(poll_interval=0.25)
        finally:
            self.server.server_close()  # stop accepting: new connections are refused
            self._wait_for_requests(SHUTDOWN_GRACE_SECONDS)
            if self.active_requests:
                log.warning("aborting %d in-flight request(s)", self.active_requests)
                self.pool.cancel_all()
                self._wait_for_requests(1.0)  # let them answer 503 before the process ends
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _shutdown(self, signal_name: str) -> None:
        log.info("received %s, shutting down", signal_name)
        self.server.shutdown()

    def _wait_for_requests(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.active_requests and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- endpoints ------------------------------------------------------------------------

    def health(self, _request: AgentHandler) -> dict[str, Any]:
        return {
            "status": "ok",
            "version": vtpu.__version__,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "suspended": self._suspended,
            "control_plane": self.heartbeat.status() if self.heartbeat else None,
        }

    def telemetry_snapshot(self, _request: AgentHandler) -> dict[str, Any]:
        return self.telemetry.snapshot()

    def metrics(self, _request: AgentHandler) -> tuple[str, str]:
        lines = [
            "# HELP vtpu_suspended 1 while the control plane has this node suspended",
            "# TYPE vtpu_suspended gauge",
            f"vtpu_suspended {int(self._suspended)}",
        ]
        if self.heartbeat:
            lines += self.heartbeat.prometheus_lines()
        text = self.telemetry.prometheus_metrics() + "\n".join(lines) + "\n"
        return "text/plain; version=0.0.4; charset=utf-8", text

    def benchmark(self, request: AgentHandler) -> dict[str, Any]:
        from vtpu import bench

        self._refuse_if_suspended()
        body = request.read_json_body()
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        unknown = set(body) - {"workloads", "quick", "repeats", "size"}
        if unknown:
            raise HTTPError(
                400, f"unknown fields {sorted(unknown)}; known: workloads, quick, repeats, size"
            )
        valid = _workload_names(bench.WORKLOADS)
        names = body.get("workloads")
        if names is not None:
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise HTTPError(400, "'workloads' must be a list of workload names")
            wrong = [n for n in names if n not in valid]
            if wrong:
                raise HTTPError(400, f"unknown workloads {wrong}", extra={"valid_workloads": valid})
        quick = body.get("quick", False)
        if not isinstance(quick, bool):
            raise HTTPError(400, "'quick' must be true or false")
        repeats = body.get("repeats")
        if repeats is not None and not (
            isinstance(repeats, int) and not isinstance(repeats, bool) and 1 <= repeats <= 100
        ):
            raise HTTPError(400, "'repeats' must be an integer from 1 to 100")
        size = body.get("size")  # overrides quick; "tiny" is for tests
        if size is not None and size not in bench.SIZES:
            raise HTTPError(400, f"'size' must be one of {', '.join(bench.SIZES)}")
        if not self.benchmark_lock.acquire(blocking=False):
            raise HTTPError(409, "a benchmark is already running on this node; retry when it ends")
        try:
            return bench.run_suite(names, quick=quick, repeats=repeats, size=size)
        finally:
            self.benchmark_lock.release()

    def run_program(self, request: AgentHandler) -> dict[str, Any]:
        from vtpu import siw

        self._refuse_if_suspended()
        content_type = request.content_type()
        accepted = ("text/plain", "application/octet-stream", "application/json")
        if content_type not in accepted:
            raise HTTPError(
                415,
                f"Content-Type {content_type or '(none)'!r} is not accepted; send SIW assembly "
                "as text/plain, binary SIW as application/octet-stream, or JSON "
                "{program | program_b64, inputs} as application/json",
            )
        body = request.read_body()
        limits = self.limits()
        inputs_json: Any = None
        try:
            if content_type == "text/plain":
                program = siw.assemble(_utf8(body, "the program"), limits)
            elif content_type == "application/octet-stream":
                program = siw.decode(body, limits)
            else:
                doc = _parse_json(body)
                if not isinstance(doc, dict):
                    raise HTTPError(400, "the body must be a JSON object")
                unknown = set(doc) - {"program", "program_b64", "inputs"}
                if unknown:
                    raise HTTPError(
                        400,
                        f"unknown fields {sorted(unknown)}; known: program, program_b64, inputs",
                    )
                inputs_json = doc.get("inputs")
                if isinstance(doc.get("program"), str) and "program_b64" not in doc:
                    program = siw.assemble(doc["program"], limits)
                elif isinstance(doc.get("program_b64"), str) and "program" not in doc:
                    try:
                        raw = base64.b64decode(doc["program_b64"], validate=True)
                    except (binascii.Error, ValueError):
                        raise HTTPError(400, "'program_b64' is not valid base64") from None
                    program = siw.decode(raw, limits)
                else:
                    raise HTTPError(
                        400, "give exactly one of 'program' (assembly) or 'program_b64' (binary)"
                    )
        except siw.ProgramError as exc:
            error = _program_error(exc)
            if exc.reason == "limits":
                error.status = 413  # the program asks for more than this node allows
            raise error from None
        check_arena(program, self.config.max_arena_bytes)
        try:
            inputs = bind_inputs(program, inputs_json)
        except InputError as exc:
            raise HTTPError(exc.status, str(exc)) from None

        return self._run_with_deadline(program, inputs)

    def limits(self) -> Any:
        from vtpu import siw

        # Every element is at least one byte, so the arena bound caps the element count too.
        return siw.Limits(
            max_tensor_elements=min(self.config.max_tensor_elements, self.config.max_arena_bytes),
            max_total_elements=self.config.max_arena_bytes,
        )

    def _run_with_deadline(self, program: Any, inputs: dict) -> dict[str, Any]:
        from vtpu import siw
        from vtpu.arena import ArenaFull
        from vtpu.sentron import RunCancelled, RunError

        run = self.pool.start(program, inputs)
        if run is None:
            raise HTTPError(
                503,
                f"all {self.pool.size} sentrons are busy; retry shortly",
                headers={"Retry-After": "1"},
            )
        if not run.done.wait(self.config.max_run_seconds):
            run.cancel()
            COUNTERS.add(errors=1)
            raise HTTPError(
                504,
                f"the program ran longer than this node's limit of "
                f"{self.config.max_run_seconds:g} s and was stopped",
            )
        error = run.error
        if isinstance(error, siw.ProgramError):
            raise _program_error(error)
        if isinstance(error, ArenaFull):
            raise HTTPError(413, str(error))
        if isinstance(error, RunCancelled):
            raise HTTPError(503, "the run was stopped because the agent is shutting down")
        if isinstance(error, RunError):
            raise HTTPError(400, str(error), extra={"word": error.index})
        if error is not None:
            raise error
        result = run.result
        return {
            "outputs": {name: tensor_to_json(value) for name, value in result.outputs.items()},
            "stats": run_stats(result),
        }


def _workload_names(workloads: Any) -> list[str]:
    if isinstance(workloads, dict):
        return list(workloads)
    return [w if isinstance(w, str) else w.name for w in workloads]


def _utf8(body: bytes, what: str) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"{what} is not UTF-8 text (byte {exc.start})") from None


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(_utf8(body, "the body"))
    except json.JSONDecodeError as exc:
        raise HTTPError(
            400, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


# (methods -> Agent method name) per path; anything else is 404, a missing method 405.
ROUTES: dict[str, dict[str, str]] = {
    "/vTPU/health": {"GET": "health"},
    "/vTPU/telemetry": {"GET": "telemetry_snapshot"},
    "/metrics": {"GET": "metrics"},
    "/vTPU/benchmark": {"POST": "benchmark"},
    "/vTPU/programs": {"POST": "run_program"},
}
PUBLIC = {"/vTPU/health"}


class AgentHandler(BaseHTTPRequestHandler):
    """One request: route, authenticate, read a bounded body, answer JSON, log one line."""

    agent: Agent  # set on the per-agent subclass
    server_version = f"vtpu-agent/{vtpu.__version__}"
    sys_version = ""
    error_content_type = "application/json"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def _dispatch(self) -> None:
        start = time.perf_counter()
        self._status = 0
        self.agent.request_started()
        path = self.path.split("?", 1)[0]
        try:
            self._route(path)
        except HTTPError as exc:
            self._send_json(exc.status, {"error": exc.reason, **exc.extra}, exc.headers)
        except (ConnectionError, TimeoutError) as exc:
            self.close_connection = True
            self._status = self._status or 408
            log.info("client connection ended: %s", exc.__class__.__name__)
        except Exception:
            COUNTERS.add(errors=1)
            log.error("internal error on %s %s\n%s", self.command, path, traceback.format_exc())
            if not self._status:
                self._send_json(500, {"error": "internal error in the agent; see its log"})
        finally:
            self.agent.request_finished()
            ms = (time.perf_counter() - start) * 1000
            # The path without its query string, never a header: nothing secret gets logged.
            log.info("%s %s %s %.1fms", self.command, _loggable(path), self._status or "-", ms)

    def _route(self, path: str) -> None:
        methods = ROUTES.get(path)
        if methods is None:
            raise HTTPError(404, f"no endpoint {path}; endpoints: {', '.join(ROUTES)}")
        if self.command not in methods:
            allow = ", ".join(methods)
            raise HTTPError(
                405,
                f"{path} does not accept {self.command}; use {allow}",
                headers={"Allow": allow},
            )
        if path not in PUBLIC and not self.agent.check_token(self.headers.get("Authorization")):
            raise HTTPError(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="vtpu"'},
            )
        result = getattr(self.agent, methods[self.command])(self)
        if isinstance(result, tuple):
            content_type, text = result
            self._send(200, content_type, text.encode("utf-8"))
        else:
            self._send_json(200, result)

    # -- request body ----------------------------------------------------------------------

    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()

    def read_body(self) -> bytes:
        """The request body, bounded: 411 without a length, 413 over the limit (before reading)."""
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "chunked bodies are not accepted; send Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise HTTPError(411, "a POST needs a Content-Length header")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, f"Content-Length {length_header!r} is not a byte count") from None
        limit = self.agent.config.max_body_bytes
        if length > limit:
            raise HTTPError(413, f"the body is {length} bytes, over the limit of {limit} bytes")
        deadline = time.monotonic() + BODY_READ_SECONDS
        chunks, remaining = [], length
        while remaining:
            if time.monotonic() > deadline:
                raise HTTPError(408, f"the body took longer than {BODY_READ_SECONDS:g} s to send")
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def read_json_body(self) -> Any:
        if self.content_type() != "application/json":
            raise HTTPError(415, "send the body as application/json")
        return _parse_json(self.read_body())

    # -- responses --------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        try:
            text = json.dumps(payload, default=_json_default, allow_nan=False)
        except ValueError:  # a NaN in stats or a benchmark result: null, as telemetry does
            text = json.dumps(_nan_to_none(payload), default=_json_default, allow_nan=False)
        body = (text + "\n").encode("utf-8")
        self._send(status, "application/json", body, headers)

    def _send(
        self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status >= 400:
            # The body may be unread (401, 411, 413...): never reuse this connection.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method...) as JSON too."""
        self._status = code
        try:
            reason = message or HTTPStatus(code).phrase
        except ValueError:
            reason = message or "error"
        self.close_connection = True
        # An unparseable request line leaves http.server assuming HTTP/0.9, which answers with
        # a bare body; nobody speaks 0.9 any more, and a status line tells the client what failed.
        self.request_version = "HTTP/1.0"
        body = (json.dumps({"error": reason}) + "\n").encode("utf-8")
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass
        path = (getattr(self, "path", None) or "-").split("?", 1)[0]
        command = _loggable(getattr(self, "command", None) or "-")
        log.info("%s %s %s", command, _loggable(path), code)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request, with timing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.info(format, *args)


def _loggable(text: str, limit: int = 200) -> str:
    """A client-chosen string made safe for a one-line log: no control characters, bounded."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, agent: Agent) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.agent = agent
        self._connections = threading.BoundedSemaphore(agent.config.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Cap the threads a flood of connections can create: past the cap, a short 503.
        if not self._connections.acquire(blocking=False):
            try:
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
                    b'{"error": "too many connections; retry shortly"}\n'
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        COUNTERS.add(errors=1)
        log.error("error serving %s\n%s", client_address[0], traceback.format_exc())


def run_agent(
    config: AgentConfig,
    *,
    rotate_token: bool = False,
    out: Any = None,
) -> int:
    """Start the agent and serve until a signal; what `vtpu agent` runs. Returns the exit code."""
    out = out or sys.stdout
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ensure_state_dir(config.state_dir)
    # The pid file first: a second agent on this state dir must not touch its config or token.
    pid_file, pid_fd = claim_pid_file(config.state_dir)
    try:
        token = os.environ.get("VTPU_TOKEN")
        if token is None and config.token_file:
            from vtpu.heartbeat import read_token_file

            token = read_token_file(Path(config.token_file).expanduser())
        if (config.control_plane is None) != (config.node_id is None):
            raise ConfigError(
                "heartbeats need both --control-plane and --node-id (or neither, for a "
                "standalone node)"
            )
        if config.control_plane and token is None:
            raise ConfigError(
                "a node managed by a control plane needs its token in clear for heartbeats: "
                "give --token-file (or VTPU_TOKEN)"
            )
        token_hash, new_token = resolve_token(
            load_saved_config(config.state_dir), rotate_token=rotate_token, env_token=token
        )
        try:
            agent = Agent(config, token_hash)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        # Saved only once the agent is listening, so a new token is never stored unseen.
        save_config(config, token_hash)
        line = f"vTPU agent listening on {agent.url}"
        if new_token:
            line += f"  token: {new_token}"
        print(line, file=out)
        if new_token:
            print(
                "  (shown once; only its hash is stored. Try: "
                f"curl -H 'Authorization: Bearer {new_token}' {agent.url}/vTPU/telemetry)",
                file=out,
            )
        elif config.token_file and "VTPU_TOKEN" not in os.environ:
            print(
                f'  token: the one in {config.token_file}. Try: curl -H "Authorization: Bearer '
                f'$(cat {config.token_file})" {agent.url}/vTPU/telemetry',
                file=out,
            )
        else:
            print(
                f"  token: the one already configured. Try: curl -H 'Authorization: Bearer "
                f"$VTPU_TOKEN' {agent.url}/vTPU/telemetry",
                file=out,
            )
        out.flush()
        if config.control_plane and config.node_id and token:
            from vtpu.heartbeat import HeartbeatClient

            agent.heartbeat = HeartbeatClient(
                agent,
                control_plane=config.control_plane,
                node_id=config.node_id,
                token=token,
                heartbeat_seconds=config.heartbeat_seconds,
                agent_url=agent.reported_url,
            )
            agent.heartbeat.start()
        try:
            agent.serve()
        finally:
            if agent.heartbeat:
                agent.heartbeat.stop()
        log.info("stopped")
        return 0
    finally:
        pid_file.unlink(missing_ok=True)  # while the lock is held: it is still ours
        os.close(pid_fd)
