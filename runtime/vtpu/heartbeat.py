"""The node's side of the control channel: enrollment, then heartbeats out and work back.

The node always calls out, so a customer's node behind NAT can be managed and the control plane
never reaches into a customer's network. `vtpu enroll` trades a one-time enrollment secret for a
node id, its node secret and its access token's hash; from then on the agent POSTs its telemetry and the results of finished actions
to {control_plane}/api/v1/agent/heartbeat every `heartbeat_seconds` and takes the actions in the
reply (benchmark, load_model, suspend, resume, rotate_token). An action is done once: its id and result are
kept in the state dir (vtpu.node_state.ActionStore), so an action delivered again, even after a
restart, is not applied again; its stored result is reported again.

Failures never stop the agent serving. An unreachable control plane (refused, timeout, 5xx, a
reply that is not JSON) is retried with exponential backoff capped at a minute; a refused token
or an unknown node (401, 404) is retried slowly with a log line that says what to check; 410 (the
node is terminated or being deprovisioned) ends the heartbeats. Each change of state is logged
once, not every beat. Heartbeats carry the node secret (never the customer access token) in the
Authorization header only, and it is never logged.

Standard library only (urllib). Contract: docs/architecture.md, "The node agent" and "Heartbeats and actions".
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import queue
import socket
import threading
import traceback
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import vtpu
from vtpu import jsonenc
from vtpu.node_state import (
    ACCESS_TOKEN_FILE,
    CONFIG_FILE,
    NODE_SECRET_FILE,
    SHA256_HEX,
    ActionStore,
    ConfigError,
    ensure_state_dir,
    hash_token,
    load_saved_config,
    write_private,
)

log = logging.getLogger("vtpu.heartbeat")

HEARTBEAT_PATH = "/api/v1/agent/heartbeat"
ENROLL_PATH = "/api/v1/enroll"
DEFAULT_HEARTBEAT_SECONDS = 15.0
MIN_HEARTBEAT_SECONDS = 0.1  # what a reply may ask for; tests beat fast
MAX_HEARTBEAT_SECONDS = 3600.0
MAX_BACKOFF_SECONDS = 60.0
# 401/404 need a person to fix something; retrying faster than this only fills logs.
REJECTED_RETRY_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_REPLY_BYTES = 1024 * 1024
# Results the control plane has not acknowledged yet; past this the oldest are dropped.
MAX_PENDING_RESULTS = 32
ACTION_TYPES = ("benchmark", "load_model", "suspend", "resume", "rotate_token")
SUSPENDED_MESSAGE = "this node is suspended by the control plane"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ChannelError(Exception):
    """A request to the control plane failed; `status` is the HTTP status, or None when there
    was no usable answer (refused, timeout, not JSON)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def post_json(url: str, body: dict, *, token: str | None = None, timeout: float) -> tuple[int, Any]:
    """POST JSON, return (status, decoded reply). Any failure is a ChannelError whose message
    names the URL and never holds the token."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"vtpu-agent/{vtpu.__version__}",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, data=jsonenc.dumps(body).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read(MAX_REPLY_BYTES)
    except urllib.error.HTTPError as exc:
        reason = _error_reason(exc)
        raise ChannelError(f"{url} answered HTTP {exc.code}{reason}", exc.code) from None
    except urllib.error.URLError as exc:
        raise ChannelError(f"cannot reach {url}: {_reason_text(exc.reason)}") from None
    except TimeoutError:
        raise ChannelError(f"{url} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ChannelError(f"cannot reach {url}: {_reason_text(exc)}") from None
    try:
        return status, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ChannelError(
            f"{url} answered HTTP {status} with something that is not JSON; is the URL the "
            "vTPU Cloud control plane?",
            None,
        ) from None


def _reason_text(reason: Any) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or reason.__class__.__name__


def _error_reason(exc: urllib.error.HTTPError) -> str:
    """': <error>' from a JSON error body, if there is one (bounded, one line)."""
    try:
        doc = json.loads(exc.read(4096).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    detail = doc.get("error") or doc.get("detail") if isinstance(doc, dict) else None
    if not isinstance(detail, str) or not detail:
        return ""
    return ": " + " ".join(detail.split())[:200]


# ---------------------------------------------------------------------------------------------
# Heartbeats


class ActionError(Exception):
    """An action could not be done; the message goes back to the control plane as its error."""


class HeartbeatClient:
    """Two daemon threads: one beats, one runs benchmark actions one at a time.

    suspend, resume and rotate_token take effect as soon as a reply brings them (they are
    instant), so a suspension never waits behind a running benchmark."""

    def __init__(
        self,
        agent: Any,
        *,
        control_plane: str,
        node_id: str,
        node_secret: str,
        heartbeat_seconds: float,
        agent_url: str | None,
        actions: ActionStore,
    ) -> None:
        self.agent = agent
        self.control_plane = control_plane.rstrip("/")
        self.endpoint = self.control_plane + HEARTBEAT_PATH
        self.node_id = node_id
        self._node_secret = node_secret
        self.actions = actions
        self.interval = float(heartbeat_seconds)
        self.agent_url = agent_url
        self.state = "starting"
        self.node_state: str | None = None
        self.last_ok_at: str | None = None
        self.last_error: str | None = None
        self.beats = {"ok": 0, "error": 0}
        self._failures = 0
        self._lock = threading.Lock()
        self._pending: collections.deque[dict] = collections.deque()
        self._running: set[str] = set()  # action ids taken but not finished
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._beater = threading.Thread(target=self._beat_loop, name="vtpu-heartbeat", daemon=True)
        self._worker = threading.Thread(target=self._action_loop, name="vtpu-actions", daemon=True)

    def start(self) -> None:
        log.info(
            "heartbeats to %s every %g s as node %s", self.endpoint, self.interval, self.node_id
        )
        self._beater.start()
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._work.put(None)

    def status(self) -> dict[str, Any]:
        """The channel as GET /vTPU/health shows it."""
        with self._lock:
            return {
                "url": self.control_plane,
                "node_id": self.node_id,
                "state": self.state,
                "node_state": self.node_state,
                "heartbeat_seconds": self.interval,
                "last_ok_at": self.last_ok_at,
                "last_error": self.last_error,
                "pending_results": len(self._pending),
            }

    def beat_counts(self) -> dict[str, int]:
        """Heartbeats sent, by outcome (for /metrics)."""
        with self._lock:
            return dict(self.beats)

    # -- beating --------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            if delay:
                self._wake.wait(delay)
                self._wake.clear()
                if self._stop.is_set():
                    break
            try:
                next_delay = self.beat()
            except Exception:  # a bug here must not end the heartbeats silently
                log.error("heartbeat failed\n%s", traceback.format_exc())
                next_delay = self._failed("error", "internal error in the agent; see its log")
            if next_delay is None:
                break
            delay = next_delay
        with self._lock:
            if self.state != "stopped":
                self.state = "stopped"

    def beat(self) -> float | None:
        """One heartbeat; returns the seconds until the next, None when heartbeats end."""
        with self._lock:
            sent = list(self._pending)
        body = {
            "node_id": self.node_id,
            "version": vtpu.__version__,
            "agent_url": self.agent_url,
            "telemetry": self.agent.telemetry_document(),
            "results": sent,
        }
        try:
            status, reply = post_json(
                self.endpoint, body, token=self._node_secret, timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ChannelError as exc:
            return self._refused(exc)
        if not isinstance(reply, dict):
            return self._failed("unreachable", f"{self.endpoint} answered with a non-object")
        self._delivered(sent)
        return self._apply(reply)

    def _delivered(self, sent: list[dict]) -> None:
        done = {id(r) for r in sent}
        with self._lock:
            self._pending = collections.deque(r for r in self._pending if id(r) not in done)
            self.beats["ok"] += 1
            self.last_ok_at = _now()
            previous, self.state = self.state, "ok"
            failures, self._failures = self._failures, 0
        if previous == "starting":
            log.info("connected to the control plane at %s", self.control_plane)
        elif previous != "ok":
            log.info(
                "heartbeats to %s get through again (after %d failed)",
                self.control_plane,
                failures,
            )

    def _apply(self, reply: dict) -> float:
        state = reply.get("state")
        if isinstance(state, str):
            self.node_state = state
        seconds = reply.get("heartbeat_seconds")
        if seconds is not None:
            if (
                isinstance(seconds, int | float)
                and not isinstance(seconds, bool)
                and MIN_HEARTBEAT_SECONDS <= seconds <= MAX_HEARTBEAT_SECONDS
            ):
                if seconds != self.interval:
                    log.info("the control plane asks for a heartbeat every %g s", seconds)
                    self.interval = float(seconds)
            else:
                log.warning("ignoring heartbeat_seconds %r from the control plane", seconds)
        if "scrape_token_sha256" in reply:  # absent from an older control plane: keep ours
            self._apply_scrape_token(reply["scrape_token_sha256"])
        actions = reply.get("actions") or []
        if not isinstance(actions, list):
            log.warning("ignoring 'actions' from the control plane: not a list")
            actions = []
        for action in actions:
            self._take(action)
        return self.interval

    def _apply_scrape_token(self, token_hash: Any) -> None:
        """The fleet's scrape token for GET /metrics, as its SHA-256 (null: none any more)."""
        if token_hash is not None and not (
            isinstance(token_hash, str) and SHA256_HEX.fullmatch(token_hash)
        ):
            log.warning("ignoring scrape_token_sha256 from the control plane: not a sha256 hex")
            return
        try:
            changed = self.agent.scrape.update(token_hash)
        except OSError as exc:
            log.error("cannot store the scrape token's hash: %s", exc)
            return
        if changed:
            log.info(
                "the control plane %s the fleet's scrape token for GET /metrics",
                "removed" if token_hash is None else "set",
            )

    def _refused(self, exc: ChannelError) -> float | None:
        if exc.status == 410:
            with self._lock:
                self.beats["error"] += 1
                self.state = "stopped"
                self.last_error = str(exc)
            log.warning(
                "the control plane says this node is terminated/deprovisioning; heartbeats stop "
                "(the agent keeps serving until it is stopped)"
            )
            return None
        if exc.status in (401, 403):
            hint = (
                f"{exc}: the control plane refused this node's secret; check that the node secret "
                "file holds the secret from enrollment (re-enroll the node if it was replaced)"
            )
            return self._failed("rejected", hint)
        if exc.status == 404:
            hint = (
                f"{exc}: the control plane does not know node {self.node_id}; check --node-id "
                "and --control-plane (or agent.json)"
            )
            return self._failed("rejected", hint)
        if exc.status is not None and exc.status < 500:
            return self._failed("rejected", str(exc))
        return self._failed("unreachable", str(exc))

    def _failed(self, state: str, message: str) -> float:
        with self._lock:
            self.beats["error"] += 1
            self._failures += 1
            failures = self._failures
            changed = state != self.state
            self.state = state
            self.last_error = message
        if state == "rejected":
            if changed:
                log.error("%s; retrying every %g s", message, REJECTED_RETRY_SECONDS)
            return max(REJECTED_RETRY_SECONDS, self.interval)
        delay = min(self.interval * 2 ** min(failures - 1, 16), MAX_BACKOFF_SECONDS)
        delay = max(delay, min(self.interval, MAX_BACKOFF_SECONDS))
        if changed:
            log.warning(
                "%s; the agent keeps serving and retries with backoff (up to %g s)",
                message,
                MAX_BACKOFF_SECONDS,
            )
        return delay

    # -- actions --------------------------------------------------------------------------

    def _take(self, action: Any) -> None:
        if not isinstance(action, dict) or not isinstance(action.get("id"), str | int):
            log.warning("ignoring an action without an id from the control plane")
            return
        action_id = str(action["id"])
        done = self.actions.get(action_id)
        if done is not None:  # done before (maybe before a restart): report it, do not redo it
            self._report(done, again=True)
            return
        with self._lock:
            if action_id in self._running:  # sent again before its result arrived
                return
            self._running.add(action_id)
        kind = action.get("type")
        log.info("action %s from the control plane: %s", action_id, _short(kind))
        if kind == "suspend":
            self.agent.set_suspended(True)
            self._finish(action_id, True, {"suspended": True})
        elif kind == "resume":
            self.agent.set_suspended(False)
            self._finish(action_id, True, {"suspended": False})
        elif kind == "rotate_token":
            token_hash = action.get("token_sha256")
            if not isinstance(token_hash, str) or not SHA256_HEX.fullmatch(token_hash):
                self._finish(
                    action_id,
                    False,
                    error="rotate_token needs 'token_sha256': the new access token's sha256 as "
                    "64 lowercase hex characters",
                )
                return
            try:
                self.agent.access.rotate(token_hash)
            except OSError as exc:
                self._finish(action_id, False, error=f"cannot store the new token hash: {exc}")
                return
            log.warning("the access token was rotated by the control plane")
            self._finish(action_id, True, {"rotated": True})
        elif kind in ("benchmark", "load_model"):  # seconds of work: the action thread's
            self._work.put((action_id, action))
        else:
            known = ", ".join(ACTION_TYPES)
            self._finish(
                action_id,
                False,
                error=f"unknown action type {_short(kind)}; this agent knows {known}",
            )

    def _action_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None or self._stop.is_set():
                return
            action_id, action = item
            try:
                if action.get("type") == "load_model":
                    result = self._load_model(action)
                else:
                    result = self._benchmark(action)
            except ActionError as exc:
                self._finish(action_id, False, error=str(exc))
            except Exception as exc:
                log.error("action %s failed\n%s", action_id, traceback.format_exc())
                self._finish(action_id, False, error=f"{exc.__class__.__name__}: {exc}")
            else:
                self._finish(action_id, True, result)

    def _load_model(self, action: dict) -> dict:
        """Make a model resident, as POST /vTPU/models does (docs/architecture.md, "Resident
        models and embeddings"); a model that cannot be loaded fails the action with why."""
        from vtpu.models import ModelError

        name = action.get("model")
        if not isinstance(name, str) or not name:
            raise ActionError("load_model needs 'model': the name of a model in the catalogue")
        precision = action.get("precision", "fp32")
        if not isinstance(precision, str):
            raise ActionError("'precision' must be a string such as fp32 or int8")
        if self.agent.suspended:
            raise ActionError(SUSPENDED_MESSAGE)
        try:
            model = self.agent.models.load(name, precision)
        except ModelError as exc:
            raise ActionError(str(exc)) from None
        return model.describe()

    def _benchmark(self, action: dict) -> dict:
        from vtpu import bench

        names = action.get("workloads")
        if names is not None:
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ActionError("'workloads' must be a list of workload names or null")
            valid = list(bench.WORKLOADS)
            wrong = [n for n in names if n not in valid]
            if wrong:
                raise ActionError(f"unknown workloads {wrong}; valid: {', '.join(valid)}")
        quick = action.get("quick", True)
        if not isinstance(quick, bool):
            raise ActionError("'quick' must be true or false")
        size = action.get("size")
        if size is not None and size not in bench.SIZES:
            raise ActionError(f"'size' must be one of {', '.join(bench.SIZES)}")
        if self.agent.suspended:
            raise ActionError(SUSPENDED_MESSAGE)
        # One benchmark at a time on a node: wait for one started over HTTP to end.
        while not self.agent.benchmark_lock.acquire(timeout=1.0):
            if self._stop.is_set():
                raise ActionError("the agent is shutting down")
        try:
            log.info("running benchmark (%s)", size or ("quick" if quick else "full"))
            return bench.run_suite(names, quick=quick, size=size)
        finally:
            self.agent.benchmark_lock.release()

    def _finish(
        self, action_id: str, ok: bool, result: Any = None, error: str | None = None
    ) -> None:
        """Remember the action as done (on disk, before it is reported), then report it."""
        record = json.loads(
            jsonenc.dumps({"action_id": action_id, "ok": ok, "result": result, "error": error})
        )
        try:
            self.actions.record(record)
        except OSError as exc:
            log.error("cannot record action %s as done: %s", action_id, exc)
        with self._lock:
            self._running.discard(action_id)
        if not ok:
            log.warning("action %s failed: %s", action_id, error)
        self._report(record)

    def _report(self, record: dict, *, again: bool = False) -> None:
        with self._lock:
            if again and any(r["action_id"] == record["action_id"] for r in self._pending):
                return  # already waiting to be delivered
            if len(self._pending) >= MAX_PENDING_RESULTS:
                dropped = self._pending.popleft()
                log.warning(
                    "dropping the undelivered result of action %s: %d results wait already",
                    dropped["action_id"],
                    MAX_PENDING_RESULTS,
                )
            self._pending.append(record)
            deliver_now = self.state == "ok"
        if deliver_now:  # do not make the control plane wait a whole interval for a result
            self._wake.set()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Enrollment


class EnrollError(Exception):
    """Enrollment failed; the message is one line for a person."""


def enroll(
    *,
    control_plane: str,
    secret: str,
    node_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8470,
    hostname: str | None = None,
    public_url: str | None = None,
    timeout: float = 30.0,
) -> tuple[str, bool]:
    """Trade the one-time secret for {node_id, node_secret, access_token_sha256,
    heartbeat_seconds, control_plane_url}; write node_dir/state/{node_secret,
    access_token.sha256, agent.json} (0600). Returns (node id, False) when the node was already
    enrolled with this control plane, without calling it."""
    control_plane = control_plane.rstrip("/")
    state_dir = node_dir / "state"
    secret_path = state_dir / NODE_SECRET_FILE
    try:
        saved = load_saved_config(state_dir)
    except ConfigError as exc:
        raise EnrollError(str(exc)) from None
    node_id = saved.get("node_id")
    if (
        node_id
        and str(saved.get("control_plane", "")).rstrip("/") == control_plane
        and secret_path.is_file()
    ):
        return str(node_id), False

    if public_url is None and host not in ("0.0.0.0", "::", ""):
        public_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    body = {
        "secret": secret,
        "hostname": hostname or socket.gethostname(),
        "agent_url": public_url,
        "port": port,
    }
    url = control_plane + ENROLL_PATH
    try:
        _status, reply = post_json(url, body, timeout=timeout)
    except ChannelError as exc:
        if exc.status == 410:
            raise EnrollError(
                "this enrollment link was already used or has expired; ask for a new one in "
                "the portal"
            ) from None
        if exc.status == 404:
            raise EnrollError(
                f"{exc}: the control plane does not know this enrollment link; check the URL "
                "or ask for a new one in the portal"
            ) from None
        raise EnrollError(str(exc)) from None
    if not isinstance(reply, dict):
        raise EnrollError(f"{url} answered with JSON that is not an object")
    node_id, node_secret = reply.get("node_id"), reply.get("node_secret")
    token_hash = reply.get("access_token_sha256")
    if not (
        isinstance(node_id, str)
        and node_id
        and isinstance(node_secret, str)
        and len(node_secret) >= 16
        and isinstance(token_hash, str)
        and SHA256_HEX.fullmatch(token_hash)
    ):
        raise EnrollError(
            f"{url} answered without a usable node_id, node_secret and access_token_sha256"
        )
    seconds = reply.get("heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS)
    if not (isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0):
        seconds = DEFAULT_HEARTBEAT_SECONDS

    try:
        ensure_state_dir(state_dir)
        write_private(secret_path, node_secret + "\n")
        write_private(state_dir / ACCESS_TOKEN_FILE, token_hash + "\n")
        config = dict(saved)
        config.update(
            host=host,
            port=port,
            control_plane=control_plane,
            node_id=node_id,
            heartbeat_seconds=seconds,
            token_sha256=token_hash,
            node_secret_sha256=hash_token(node_secret),
        )
        if public_url is not None:
            config["public_url"] = public_url
        write_private(state_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    except OSError as exc:
        raise EnrollError(f"cannot write the node's state in {state_dir}: {exc}") from None
    return node_id, True
