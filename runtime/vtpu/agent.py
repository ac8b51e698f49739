"""The node agent: the vTPU's HTTP service (Starlette on uvicorn, run in-process).

Every endpoint but `GET /vTPU/health` wants `Authorization: Bearer <access token>`; only the
token's SHA-256 is on the node (STATE_DIR/access_token.sha256), compared in constant time and
never logged. `GET /metrics` also takes the fleet's scrape token (Prometheus), known here by the
SHA-256 the control plane's heartbeat replies carry (STATE_DIR/scrape_token.sha256). Bad input
gets a 4xx with a JSON reason and the service keeps running; a bug in a handler is a 500,
counted in the node's `errors` counter, with the traceback in the agent's log, not in the
answer. Connections are kept alive; programs wait in a bounded queue for a free
sentron and run on their own threads, benchmarks and telemetry in the thread pool, so the event
loop only moves bytes.

Contract: docs/architecture.md, "The node agent" and "Heartbeats and actions"; state files: vtpu.node_state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

import vtpu
from vtpu import jsonenc
from vtpu.binding import InputError, bind_inputs, output_json_bytes, run_stats, tensor_to_json
from vtpu.counters import COUNTERS
from vtpu.models import ModelsConfig
from vtpu.node_state import (
    COUNTERS_FILE,
    SUSPENDED_FILE,
    AccessToken,
    ActionStore,
    AgentConfig,
    ConfigError,
    ScrapeToken,
    claim_pid_file,
    ensure_state_dir,
    hash_token,
    read_secret_file,
    resolve_access_token,
    save_config,
    write_private,
    write_token_hash,
)

log = logging.getLogger("vtpu.agent")

# Seconds a client may take to send a whole request body, whatever its pace.
BODY_READ_SECONDS = 60.0
# Seconds in-flight requests get to finish after SIGTERM before their runs are aborted.
SHUTDOWN_GRACE_SECONDS = 5.0
RETRY_AFTER_SECONDS = "1"
SERVER_HEADER = f"vtpu-agent/{vtpu.__version__}"


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


def check_output_size(program: Any, max_bytes: int) -> None:
    """Refuse, before it runs, a program whose outputs would make an answer over the limit."""
    estimate = output_json_bytes(program)
    if estimate > max_bytes:
        shapes = ", ".join(
            f"{t.name} {t.dtype}{list(t.shape)}" for t in program.tensors if t.output
        )
        raise HTTPError(
            413,
            f"the program's outputs ({shapes}) would make about {estimate} bytes of JSON; this "
            f"node answers at most {max_bytes} bytes: output less, or reduce on the node",
        )


# ---------------------------------------------------------------------------------------------
# Sentrons: a fixed pool and a bounded queue in front of it


class SentronPool:
    """A fixed set of sentrons. A request takes an idle one, or waits in a bounded FIFO queue
    for one, up to a deadline; only a full queue or a wait past its deadline is refused (503).

    The queue lives on the event loop: acquire() and _release() run there; a run's thread
    hands its sentron back with call_soon_threadsafe."""

    def __init__(self, size: int, arena_bytes: int, max_queue: int) -> None:
        self.size = size
        self.arena_bytes = arena_bytes
        self.max_queue = max_queue
        self._idle: collections.deque = collections.deque(self._new(i) for i in range(size))
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._runs: set[ProgramRun] = set()
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.refused = 0

    def _new(self, sentron_id: int) -> Any:
        from vtpu.arena import Arena
        from vtpu.sentron import Sentron

        # np.empty leaves the arena's pages untouched: an idle sentron costs address space only.
        return Sentron(Arena(self.arena_bytes), sentron_id=sentron_id)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def _refuse(self, reason: str) -> HTTPError:
        self.refused += 1
        return HTTPError(503, reason, headers={"Retry-After": RETRY_AFTER_SECONDS})

    async def acquire(self, wait_seconds: float) -> Any:
        self.loop = asyncio.get_running_loop()
        if self._idle and not self.waiting:
            return self._idle.popleft()
        if self.waiting >= self.max_queue:
            raise self._refuse(
                f"all {self.size} sentrons are busy and {self.max_queue} programs already wait "
                "for one; retry shortly"
            )
        future = self.loop.create_future()
        self._waiters.append(future)
        try:
            return await asyncio.wait_for(future, wait_seconds)
        except TimeoutError:
            raise self._refuse(
                f"no sentron came free within {wait_seconds:g} s (all {self.size} busy); "
                "retry shortly"
            ) from None
        except BaseException:
            if future.done() and not future.cancelled():
                self._release(future.result())  # handed over just as the wait ended
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(future)

    def _release(self, sentron: Any) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(sentron)
                return
        self._idle.append(sentron)

    def start(self, sentron: Any, program: Any, inputs: dict) -> ProgramRun:
        run = ProgramRun(self, sentron, program, inputs, asyncio.get_running_loop())
        with self._lock:
            self._runs.add(run)
        run.thread.start()
        return run

    def finished(self, run: ProgramRun) -> None:
        """A run's thread ended: its sentron goes back to the pool (or to the next waiter)."""
        with self._lock:
            self._runs.discard(run)
        try:
            run.loop.call_soon_threadsafe(self._release, run.sentron)
        except RuntimeError:  # the loop is closed: the agent is gone
            pass

    def cancel_all(self) -> None:
        with self._lock:
            runs = list(self._runs)
        for run in runs:
            run.cancel()


class ProgramRun:
    """One program on one sentron, in a thread of its own so the request can stop waiting.

    cancel() sets this run's own cancel event: the sentron stops before its next word (a
    kernel already running finishes first), and a later run on the sentron is never touched."""

    def __init__(
        self,
        pool: SentronPool,
        sentron: Any,
        program: Any,
        inputs: dict,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pool = pool
        self.sentron = sentron
        self.program = program
        self.inputs = inputs
        self.loop = loop
        self.cancel_event = threading.Event()
        self.done: asyncio.Future = loop.create_future()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="vtpu-run", daemon=True)

    def _work(self) -> None:
        try:
            self.result = self.sentron.run(self.program, self.inputs, cancel=self.cancel_event)
        except Exception as exc:  # handed to the request
            self.error = exc
        self.pool.finished(self)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_set_done, self.done)

    def cancel(self) -> None:
        self.cancel_event.set()


def _model_call(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), with a refused model request (vtpu.models.ModelError) as its HTTP answer."""
    from vtpu.models import ModelError

    try:
        return fn(*args)
    except ModelError as exc:
        extra = {"code": exc.code, "param": exc.param}
        raise HTTPError(exc.status, str(exc), extra=extra) from None


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# ---------------------------------------------------------------------------------------------
# The agent


class Agent:
    """The node agent: owns the sentron pool, telemetry, the access token and the channel."""

    def __init__(
        self, config: AgentConfig, access: AccessToken, models: ModelsConfig | None = None
    ) -> None:
        from vtpu.models.saved import SavedModelRegistry
        from vtpu.telemetry import Telemetry

        self.config = config
        self.access = access
        self.scrape = ScrapeToken(config.state_dir)  # the fleet's Prometheus: GET /metrics only
        self.started = time.monotonic()
        COUNTERS.attach(config.state_dir / COUNTERS_FILE)
        workers = config.workers or os.cpu_count() or 1
        self.telemetry = Telemetry(tdp_watts=config.tdp_watts, sentrons=workers)
        self.pool = SentronPool(workers, config.max_arena_bytes, config.max_queue)
        self.benchmark_lock = threading.Lock()
        self.models_config = models or ModelsConfig()
        self.models = SavedModelRegistry(  # its loads are kept in agent.json
            config.state_dir,
            max_bytes=self.models_config.max_bytes,
            max_batch_tokens=self.models_config.max_batch_tokens,
            model_dirs={n: Path(d) for n, d in self.models_config.model_dirs},
            kv_cache_bytes=self.models_config.kv_cache_bytes,
            max_sequences=self.models_config.max_sequences,
        )
        self._batchers: dict[int, Any] = {}  # id(LoadedModel) -> its embeddings Batcher
        self.heartbeat: Any = None  # a vtpu.heartbeat.HeartbeatClient once started
        # Kept across restarts: a node suspended for non-payment stays suspended until resumed.
        self._suspended = (config.state_dir / SUSPENDED_FILE).exists()
        self._active = 0
        self._active_lock = threading.Lock()
        self.url = ""

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
            write_private(marker, time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))
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

    def state(self) -> dict[str, Any]:
        """The agent's own figures for /metrics."""
        return {
            "suspended": self._suspended,
            "sentrons": self.pool.size,
            "queue_waiting": self.pool.waiting,
            "queue_refused": self.pool.refused,
            "heartbeats": self.heartbeat.beat_counts() if self.heartbeat else None,
            "models": self.models.summary(),
        }

    # -- endpoints ------------------------------------------------------------------------

    async def health(self, request: Request) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": "ok", "version": vtpu.__version__}
        if not self.access.check(request.headers.get("authorization")):
            return doc  # liveness only: nothing about the node without the access token
        doc.update(
            node_id=self.config.node_id,
            uptime_seconds=round(time.monotonic() - self.started, 3),
            suspended=self._suspended,
            sentrons=self.pool.size,
            queue_waiting=self.pool.waiting,
            control_plane=self.heartbeat.status() if self.heartbeat else None,
        )
        return doc

    def telemetry_document(self) -> dict[str, Any]:
        """GET /vTPU/telemetry's document, which heartbeats carry too: the runtime's figures and
        the resident models' work (requests, inputs embedded, tokens), so the control plane's
        monitoring and billing see the real work a node did, not only its ops."""
        doc = self.telemetry.snapshot()
        doc["models"] = self.models.summary()
        return doc

    async def telemetry_snapshot(self, _request: Request) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self.telemetry_document)

    # -- resident models and embeddings (docs/architecture.md, "Resident models and embeddings")

    async def models_list(self, _request: Request) -> dict[str, Any]:
        return {
            "models": await anyio.to_thread.run_sync(self.models.list),
            "max_bytes": self.models.max_bytes,
            "used_bytes": self.models.used_bytes(),
        }

    async def _model_name(self, request: Request) -> str:
        body = await read_json_body(request, self.config.max_body_bytes)
        if (
            not isinstance(body, dict)
            or set(body) != {"model"}
            or not isinstance(body["model"], str)
        ):
            raise HTTPError(400, 'the body must be {"model": "<model id>"}')
        return body["model"]

    async def model_load(self, request: Request) -> dict[str, Any]:
        self._refuse_if_suspended()
        body = await read_json_body(request, self.config.max_body_bytes)
        if (
            not isinstance(body, dict)
            or "model" not in body
            or not set(body) <= {"model", "precision"}
            or not isinstance(body["model"], str)
            or not isinstance(body.get("precision", ""), str)
        ):
            raise HTTPError(
                400,
                'the body must be {"model": "<model id>"}, optionally with "precision": '
                '"fp32" (the default), "bf16", "int8" or "int8-dynamic"',
            )
        precision = body.get("precision", "fp32")
        model = await anyio.to_thread.run_sync(
            _model_call, self.models.load, body["model"], precision
        )
        log.info("model %s loaded in %s (%d bytes)", model.name, model.precision, model.bytes)
        return model.describe()

    async def model_unload(self, request: Request) -> dict[str, Any]:
        name = await self._model_name(request)
        # In a worker thread: an LLM's engine finishes its step before it stops.
        model = await anyio.to_thread.run_sync(_model_call, self.models.unload, name)
        self._batchers.pop(id(model), None)
        log.info("model %s unloaded", model.name)
        return {"id": model.name, "state": "unloaded", "freed_bytes": model.bytes}

    async def openai_models(self, _request: Request) -> dict[str, Any]:
        loaded = [m for m in self.models.list() if m["state"] == "loaded"]
        return {
            "object": "list",
            "data": [
                {
                    "id": m["id"],
                    "object": "model",
                    "created": int(m["loaded_at"]),
                    "owned_by": "vtpu",
                }
                for m in loaded
            ],
        }

    async def embeddings(self, request: Request) -> Response:
        from vtpu.models import embeddings

        self._refuse_if_suspended()
        body = await read_json_body(request, self.config.max_body_bytes)
        parsed = _model_call(embeddings.parse_request, body, self.models_config.max_inputs)
        model = _model_call(self.models.get, parsed.model)
        if model.kind != "embedding":
            raise HTTPError(
                400,
                f"{model.name} is not an embedding model (it is an {model.kind}): use "
                "/v1/completions or /v1/chat/completions",
                extra={"param": "model", "code": "wrong_model_kind"},
            )
        sequences = await anyio.to_thread.run_sync(_model_call, embeddings.tokenize, model, parsed)
        batcher = self._batchers.get(id(model))
        if batcher is None or batcher.model is not model:
            batcher = embeddings.Batcher(
                model,
                window_seconds=self.models_config.batch_window_seconds,
                max_batch_tokens=self.models_config.max_batch_tokens,
            )
            self._batchers[id(model)] = batcher
        vectors = await batcher.submit(sequences)
        tokens = sum(len(s) for s in sequences)
        stats = model.stats
        stats.requests += 1
        stats.inputs += len(sequences)
        stats.tokens += tokens
        text = await anyio.to_thread.run_sync(
            lambda: jsonenc.dumps(
                embeddings.response(model, vectors, tokens, parsed.encoding_format)
            )
        )
        return _text_response(200, text + "\n", "application/json")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        """An LLM's completion, whole or streamed (docs/architecture.md, "LLM decoding (Qwen3)")."""
        from starlette.responses import StreamingResponse

        from vtpu.models import ModelError, completions

        self._refuse_if_suspended()
        body = await read_json_body(request, self.config.max_body_bytes)
        parse = completions.parse_chat if chat else completions.parse_completion
        parsed = _model_call(parse, body)
        model = _model_call(self.models.get, parsed.model)
        if model.engine is None:
            raise HTTPError(
                400,
                f"{model.name} is an embedding model: it answers /v1/embeddings, not "
                f"{request.url.path}",
                extra={"param": "model", "code": "wrong_model_kind"},
            )
        prompt = await anyio.to_thread.run_sync(_model_call, completions.prompt_ids, model, parsed)
        try:
            params = completions.sampling_params(model.engine, parsed, len(prompt))
            handle = model.engine.submit(prompt, params, asyncio.get_running_loop())
        except ModelError as exc:
            headers = {"Retry-After": RETRY_AFTER_SECONDS} if exc.status == 429 else None
            extra = {"code": exc.code, "param": exc.param}
            raise HTTPError(exc.status, str(exc), extra=extra, headers=headers) from None
        if parsed.stream:
            return StreamingResponse(
                completions.stream(model, parsed, handle),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "Server": SERVER_HEADER},
            )
        try:
            doc = await completions.complete_unless_disconnected(
                model, parsed, handle, request.receive
            )
        except ModelError as exc:
            raise HTTPError(exc.status, str(exc), extra={"code": exc.code}) from None
        if doc is None:  # the client left: its pages are free, nobody to answer
            return Response(status_code=499, headers={"Connection": "close"})
        return json_response(200, doc)

    async def metrics(self, _request: Request) -> Response:
        from vtpu.metrics import CONTENT_TYPE, exposition

        text = await anyio.to_thread.run_sync(exposition, self.telemetry, self.state)
        return Response(text, media_type=None, headers={"Content-Type": CONTENT_TYPE})

    async def benchmark(self, request: Request) -> dict[str, Any]:
        from vtpu import bench

        self._refuse_if_suspended()
        body = await read_json_body(request, self.config.max_body_bytes)
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        unknown = set(body) - {"workloads", "quick", "repeats", "size"}
        if unknown:
            raise HTTPError(
                400, f"unknown fields {sorted(unknown)}; known: workloads, quick, repeats, size"
            )
        valid = list(bench.WORKLOADS)
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
            return await anyio.to_thread.run_sync(
                lambda: bench.run_suite(names, quick=quick, repeats=repeats, size=size)
            )
        finally:
            self.benchmark_lock.release()

    async def run_program(self, request: Request) -> Response:
        self._refuse_if_suspended()
        content_type = _content_type(request)
        accepted = ("text/plain", "application/octet-stream", "application/json")
        if content_type not in accepted:
            raise HTTPError(
                415,
                f"Content-Type {content_type or '(none)'!r} is not accepted; send SIW assembly "
                "as text/plain, binary SIW as application/octet-stream, or JSON "
                "{program | program_b64, inputs} as application/json",
            )
        body = await read_body(request, self.config.max_body_bytes)
        program, inputs = await anyio.to_thread.run_sync(self._parse_program, content_type, body)
        doc = await self._run_queued(program, inputs)
        text = await anyio.to_thread.run_sync(jsonenc.dumps, doc)
        return _text_response(200, text + "\n", "application/json")

    def _parse_program(self, content_type: str, body: bytes) -> tuple[Any, dict]:
        from vtpu import siw

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
        check_output_size(program, self.config.max_output_bytes)
        if inputs_json is None:
            inputs_json = {}
        try:
            inputs = bind_inputs(program, inputs_json)
        except InputError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        return program, inputs

    def limits(self) -> Any:
        from vtpu import siw

        # Every element is at least one byte, so the arena bound caps the element count too.
        return siw.Limits(
            max_tensor_elements=min(self.config.max_tensor_elements, self.config.max_arena_bytes),
            max_total_elements=self.config.max_arena_bytes,
        )

    async def _run_queued(self, program: Any, inputs: dict) -> dict[str, Any]:
        from vtpu import siw
        from vtpu.arena import ArenaFull
        from vtpu.sentron import RunCancelled, RunError

        sentron = await self.pool.acquire(self.config.queue_wait_seconds)
        run = self.pool.start(sentron, program, inputs)
        try:
            await asyncio.wait_for(asyncio.shield(run.done), self.config.max_run_seconds)
        except TimeoutError:
            run.cancel()
            COUNTERS.add(errors=1)
            raise HTTPError(
                504,
                f"the program ran longer than this node's limit of "
                f"{self.config.max_run_seconds:g} s and was stopped",
            ) from None
        except asyncio.CancelledError:  # the client went away or the agent is stopping
            run.cancel()
            raise
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


# ---------------------------------------------------------------------------------------------
# HTTP: requests and answers


def _content_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, bounded: 411 without a length, 413 over the limit (before reading)."""
    if request.headers.get("transfer-encoding"):
        raise HTTPError(411, "chunked bodies are not accepted; send Content-Length")
    length_header = request.headers.get("content-length")
    if length_header is None:
        raise HTTPError(411, "a POST needs a Content-Length header")
    try:
        length = int(length_header)
        if length < 0:
            raise ValueError
    except ValueError:
        raise HTTPError(400, f"Content-Length {length_header!r} is not a byte count") from None
    if length > limit:
        raise HTTPError(413, f"the body is {length} bytes, over the limit of {limit} bytes")
    chunks: list[bytes] = []
    try:
        with anyio.fail_after(BODY_READ_SECONDS):
            async for chunk in request.stream():
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, f"the body took longer than {BODY_READ_SECONDS:g} s to send") from None
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int) -> Any:
    if _content_type(request) != "application/json":
        raise HTTPError(415, "send the body as application/json")
    return _parse_json(await read_body(request, limit))


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


def _text_response(
    status: int, text: str, content_type: str, headers: dict[str, str] | None = None
) -> Response:
    all_headers = {"Cache-Control": "no-store", "Server": SERVER_HEADER, **(headers or {})}
    if status >= 400:
        # The body may be unread (401, 411, 413...): never reuse this connection.
        all_headers["Connection"] = "close"
    all_headers["Content-Type"] = content_type
    return Response(text.encode("utf-8"), status_code=status, headers=all_headers)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return _text_response(status, jsonenc.dumps(payload) + "\n", "application/json", headers)


# (methods -> Agent method name) per path; anything else is 404, a missing method 405.
ROUTES: dict[str, dict[str, str]] = {
    "/vTPU/health": {"GET": "health"},
    "/vTPU/telemetry": {"GET": "telemetry_snapshot"},
    "/metrics": {"GET": "metrics"},
    "/vTPU/benchmark": {"POST": "benchmark"},
    "/vTPU/programs": {"POST": "run_program"},
    "/vTPU/models": {"GET": "models_list", "POST": "model_load"},
    "/vTPU/models/unload": {"POST": "model_unload"},
    "/v1/models": {"GET": "openai_models"},
    "/v1/embeddings": {"POST": "embeddings"},
    "/v1/completions": {"POST": "completions"},
    "/v1/chat/completions": {"POST": "chat_completions"},
}
# OpenAI-compatible endpoints answer errors in OpenAI's shape, which its clients parse.
OPENAI_PREFIX = "/v1/"
PUBLIC = {"/vTPU/health"}
SCRAPE_PATH = "/metrics"  # the one endpoint the fleet's scrape token opens (GET only)
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def _endpoint(agent: Agent, path: str) -> Callable[[Request], Awaitable[Response]]:
    methods = ROUTES[path]

    async def endpoint(request: Request) -> Response:
        try:
            name = methods.get(request.method)
            if name is None:
                allow = ", ".join(methods)
                raise HTTPError(
                    405,
                    f"{path} does not accept {_loggable(request.method)}; use {allow}",
                    headers={"Allow": allow},
                )
            if path not in PUBLIC and not _authorized(agent, request, path):
                raise HTTPError(
                    401,
                    "missing or wrong token: send 'Authorization: Bearer <token>'",
                    headers={"WWW-Authenticate": 'Bearer realm="vtpu"'},
                )
            result = await getattr(agent, name)(request)
        except HTTPError as exc:
            if path.startswith(OPENAI_PREFIX):
                return json_response(exc.status, _openai_error(exc), exc.headers)
            return json_response(exc.status, {"error": exc.reason, **exc.extra}, exc.headers)
        except ClientDisconnect:
            return Response(status_code=400, headers={"Connection": "close"})
        except Exception:
            COUNTERS.add(errors=1)
            log.error("internal error on %s %s\n%s", request.method, path, traceback.format_exc())
            return json_response(500, {"error": "internal error in the agent; see its log"})
        if isinstance(result, Response):
            result.headers.setdefault("Cache-Control", "no-store")
            result.headers.setdefault("Server", SERVER_HEADER)
            return result
        return json_response(200, result)

    return endpoint


def _openai_error(exc: HTTPError) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status)
    if kind is None:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return {
        "error": {
            "message": exc.reason,
            "type": kind,
            "param": exc.extra.get("param"),
            "code": exc.extra.get("code"),
        }
    }


def _authorized(agent: Agent, request: Request, path: str) -> bool:
    """The access token opens every endpoint; the fleet's scrape token only GET /metrics."""
    header = request.headers.get("authorization")
    if agent.access.check(header):
        return True
    return path == SCRAPE_PATH and request.method == "GET" and agent.scrape.check(header)


async def _not_found(request: Request) -> Response:
    error = HTTPError(
        404, f"no endpoint {_loggable(request.url.path)}; endpoints: {', '.join(ROUTES)}"
    )
    if request.url.path.startswith(OPENAI_PREFIX):
        return json_response(404, _openai_error(error))
    return json_response(404, {"error": error.reason})


def build_app(agent: Agent) -> Any:
    """The ASGI app: Starlette routes wrapped in the one-line-per-request log."""
    # Every method reaches the endpoint, which answers 405 with the right Allow itself.
    routes = [Route(path, _endpoint(agent, path), methods=ANY_METHOD) for path in ROUTES]
    routes.append(Route("/{rest:path}", _not_found, methods=ANY_METHOD))
    return _RequestLog(Starlette(routes=routes), agent)


class _RequestLog:
    """Counts requests in flight (for a graceful stop) and logs one line per request: method,
    path without its query string, status and time. Never a header: nothing secret is logged."""

    def __init__(self, app: Any, agent: Agent) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_logged(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.agent.request_started()
        try:
            await self.app(scope, receive, send_logged)
        finally:
            self.agent.request_finished()
            ms = (time.perf_counter() - start) * 1000
            log.info(
                "%s %s %s %.1fms",
                _loggable(scope["method"]),
                _loggable(scope["path"]),
                status or "-",
                ms,
            )


def _loggable(text: str, limit: int = 200) -> str:
    """A client-chosen string made safe for a one-line log: no control characters, bounded."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with the agent's manners: a client that does not finish sending
    its request head within the socket timeout is disconnected (uvicorn only times out idle
    keep-alive connections), and a request h11 cannot parse gets a JSON 400."""

    header_timeout = 10.0  # set per agent

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_head_timer()
        elif not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = (json.dumps({"error": f"bad request: {msg}"}) + "\n").encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass
        self.transport.close()
        log.info("- - 400 (unparseable request)")


class _Server(uvicorn.Server):
    """uvicorn's server with the agent's signal handling: SIGTERM/SIGINT stop accepting, give
    in-flight requests SHUTDOWN_GRACE_SECONDS, then abort their runs; the process then exits 0
    (uvicorn's own handler re-raises the signal after shutting down, which would kill it)."""

    def __init__(self, config: uvicorn.Config, agent: Agent) -> None:
        super().__init__(config)
        self.agent = agent

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, _frame: Any) -> None:
            if self.should_exit:
                return
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.should_exit = True
            timer = threading.Timer(SHUTDOWN_GRACE_SECONDS, self._abort_runs)
            timer.daemon = True
            timer.start()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _abort_runs(self) -> None:
        if self.agent.active_requests:
            log.warning("aborting %d in-flight request(s)", self.agent.active_requests)
            self.agent.pool.cancel_all()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP stated: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so, and
    # with Nagle on, a response's head and body in two writes wait 40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def serve(agent: Agent, sock: socket.socket) -> None:
    """Serve on `sock` until SIGTERM/SIGINT, in this thread (uvicorn's event loop)."""
    protocol = type("AgentProtocol", (_Protocol,), {"header_timeout": agent.config.socket_timeout})
    config = uvicorn.Config(
        build_app(agent),
        http=protocol,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=max(1, int(agent.config.socket_timeout)),
        limit_concurrency=agent.config.max_connections,
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS + 2),
        ws="none",
    )
    _Server(config, agent).run(sockets=[sock])


def run_agent(
    config: AgentConfig,
    *,
    rotate_token: bool = False,
    out: Any = None,
    models: ModelsConfig | None = None,
) -> int:
    """Start the agent and serve until a signal; what `vtpu agent` runs. Returns the exit code."""
    out = out or sys.stdout
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ensure_state_dir(config.state_dir)
    # The pid file first: a second agent on this state dir must not touch its files.
    pid_file, pid_fd = claim_pid_file(config.state_dir)
    try:
        if (config.control_plane is None) != (config.node_id is None):
            raise ConfigError(
                "heartbeats need both --control-plane and --node-id (or neither, for a "
                "standalone node)"
            )
        node_secret = None
        if config.control_plane:
            path = config.node_secret_path
            if not path.exists():
                raise ConfigError(
                    f"a node managed by a control plane needs its node secret for heartbeats: "
                    f"{path} does not exist; give --node-secret-file (or run 'vtpu enroll')"
                )
            node_secret = read_secret_file(path, "node secret")
        token_hash, new_token, token_source = resolve_access_token(
            config.state_dir,
            token_file=config.token_file,
            env_token=os.environ.get("VTPU_TOKEN"),
            rotate=rotate_token,
        )
        secret_hash = hash_token(node_secret) if node_secret else None
        if secret_hash == token_hash:
            raise ConfigError(
                "the access token and the node secret are the same; they must differ (the node "
                "secret is for heartbeats only, never accepted as an API token)"
            )
        sock = _listen(config.host, config.port)
        agent = Agent(config, AccessToken(config.state_dir, token_hash), models)
        for name in agent.models_config.preload:
            from vtpu.models import ModelError

            try:
                loaded = agent.models.load(name, agent.models_config.preload_precision)
            except ModelError as exc:
                sock.close()
                raise ConfigError(f"--load-model {name}: {exc}") from None
            log.info("model %s loaded (%d bytes)", loaded.name, loaded.bytes)
        agent.models.load_saved()  # what it served before a restart
        host, port = sock.getsockname()[:2]
        agent.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        # Written only once the agent can listen, so a new token is never stored unseen.
        write_token_hash(config.state_dir, token_hash)
        save_config(config, token_hash, secret_hash)
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
        elif config.token_file:
            print(
                f'  token: {token_source}. Try: curl -H "Authorization: Bearer '
                f'$(cat {config.token_file})" {agent.url}/vTPU/telemetry',
                file=out,
            )
        else:
            print(
                f"  token: {token_source}. Try: curl -H 'Authorization: Bearer "
                f"$VTPU_TOKEN' {agent.url}/vTPU/telemetry",
                file=out,
            )
        out.flush()
        if config.control_plane and config.node_id and node_secret:
            from vtpu.heartbeat import HeartbeatClient

            agent.heartbeat = HeartbeatClient(
                agent,
                control_plane=config.control_plane,
                node_id=config.node_id,
                node_secret=node_secret,
                heartbeat_seconds=config.heartbeat_seconds,
                agent_url=agent.reported_url,
                actions=ActionStore(config.state_dir),
            )
            agent.heartbeat.start()
        try:
            serve(agent, sock)
        finally:
            if agent.heartbeat:
                agent.heartbeat.stop()
        log.info("stopped")
        return 0
    finally:
        pid_file.unlink(missing_ok=True)  # while the lock is held: it is still ours
        os.close(pid_fd)
