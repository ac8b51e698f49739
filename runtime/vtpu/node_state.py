"""The node's configuration and state dir, shared by the agent and its control channel.

STATE_DIR (0700) holds:
  agent.json           the agent's configuration, plus token_sha256 and node_secret_sha256, and
                       "models": the models loaded, loaded again at start (vtpu.models.saved)
  access_token.sha256  sha256 hex of the customer access token (0600); the token itself is never
                       stored on a node
  node_secret          the node secret in clear (0600): only the Bearer of heartbeats
  actions.json         the control plane's actions already done, with their results (0600)
  scrape_token.sha256  sha256 hex of the fleet's scrape token (0600), from heartbeat replies:
                       it opens GET /metrics only
  agent.pid, counters, suspended
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("vtpu.agent")

MiB = 1024 * 1024
CONFIG_FILE = "agent.json"
PID_FILE = "agent.pid"
COUNTERS_FILE = "counters"
SUSPENDED_FILE = "suspended"  # present while the control plane has the node suspended
ACCESS_TOKEN_FILE = "access_token.sha256"
NODE_SECRET_FILE = "node_secret"
ACTIONS_FILE = "actions.json"
SCRAPE_TOKEN_FILE = "scrape_token.sha256"
MAX_REMEMBERED_ACTIONS = 500
MIN_SECRET_CHARS = 16
DEFAULT_TDP_WATTS = 125.0
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SAVED_MODELS_KEY = "models"  # agent.json: [{"name", "precision"}] loaded again at start
_CONFIG_LOCK = threading.Lock()


def default_state_dir() -> Path:
    """$VTPU_STATE_DIR, else ~/.local/state/vtpu (XDG's place for state that outlives a run)."""
    env = os.environ.get("VTPU_STATE_DIR")
    return Path(env) if env else Path.home() / ".local" / "state" / "vtpu"


@dataclasses.dataclass
class AgentConfig:
    """What an agent runs with; saved in agent.json (plus the credential hashes) on every start."""

    host: str = "127.0.0.1"
    port: int = 8470
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    tdp_watts: float | None = None  # None: DEFAULT_TDP_WATTS, labelled "default"
    max_body_bytes: int = 16 * MiB
    max_output_bytes: int = 16 * MiB  # estimated JSON size of a program's outputs
    max_run_seconds: float = 30.0
    max_tensor_elements: int = 16 * MiB  # per tensor: 64 MiB of f32
    max_arena_bytes: int = 256 * MiB  # all of one program's tensors together
    socket_timeout: float = 10.0
    max_connections: int = 256
    workers: int = 0  # sentrons in the pool; 0 = one per core
    max_queue: int = 64  # programs waiting for a sentron; past this, 503
    queue_wait_seconds: float = 30.0  # longest wait for a sentron; past this, 503
    # The control channel (vtpu.heartbeat): heartbeats start when both are set.
    control_plane: str | None = None
    node_id: str | None = None
    heartbeat_seconds: float = 15.0
    public_url: str | None = None  # the agent_url reported; default http://host:port
    token_file: str | None = None  # the access token in clear, hashed at start (optional)
    node_secret_file: str | None = None  # default STATE_DIR/node_secret

    # Fields persisted in agent.json; state_dir is where the file is, so it is not among them.
    PERSISTED = (
        "host",
        "port",
        "tdp_watts",
        "max_body_bytes",
        "max_output_bytes",
        "max_run_seconds",
        "max_tensor_elements",
        "max_arena_bytes",
        "socket_timeout",
        "max_connections",
        "workers",
        "max_queue",
        "queue_wait_seconds",
        "control_plane",
        "node_id",
        "heartbeat_seconds",
        "public_url",
        "token_file",
        "node_secret_file",
    )

    @property
    def node_secret_path(self) -> Path:
        if self.node_secret_file:
            return Path(self.node_secret_file).expanduser()
        return self.state_dir / NODE_SECRET_FILE


class ConfigError(Exception):
    """The agent cannot start with this configuration; the message says what to fix."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, atomically (no half-written file on a crash)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_state_dir(state_dir: Path) -> None:
    """The state dir holds credentials and the node's counters: owner-only (0700)."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
        os.chmod(state_dir, 0o700)  # whatever the umask
    elif stat.S_IMODE(state_dir.stat().st_mode) & 0o077:
        log.warning("state dir %s is readable by others; chmod 700 it", state_dir)


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


def save_config(config: AgentConfig, token_hash: str, node_secret_hash: str | None) -> None:
    record: dict[str, Any] = {name: getattr(config, name) for name in AgentConfig.PERSISTED}
    record["token_sha256"] = token_hash
    record["node_secret_sha256"] = node_secret_hash
    with _CONFIG_LOCK:
        # the loaded models are the agent's state, not its command line (vtpu.models.saved)
        models = load_saved_config(config.state_dir).get(SAVED_MODELS_KEY)
        if models is not None:
            record[SAVED_MODELS_KEY] = models
        write_private(config.state_dir / CONFIG_FILE, json.dumps(record, indent=2) + "\n")


def update_saved_config(state_dir: Path, **fields: Any) -> None:
    with _CONFIG_LOCK:  # a model load and a token rotation may both update it at once
        saved = load_saved_config(state_dir)
        saved.update(fields)
        write_private(state_dir / CONFIG_FILE, json.dumps(saved, indent=2) + "\n")


def read_secret_file(path: Path, what: str) -> str:
    """A token or secret in clear, from a file only its owner should read."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc}") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the {what} in {path} is too short: use at least {MIN_SECRET_CHARS} characters"
        )
    if mode & 0o077:
        log.warning("%s file %s is readable by others; chmod 600 it", what, path)
    return secret


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
# The customer access token


def read_token_hash(state_dir: Path) -> str | None:
    path = state_dir / ACCESS_TOKEN_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not SHA256_HEX.fullmatch(text):
        raise ConfigError(f"{path} must hold a sha256 hex digest (64 lowercase hex characters)")
    return text


def write_token_hash(state_dir: Path, token_hash: str) -> None:
    if not SHA256_HEX.fullmatch(token_hash):
        raise ValueError("an access-token hash is 64 lowercase hex characters")
    write_private(state_dir / ACCESS_TOKEN_FILE, token_hash + "\n")


def resolve_access_token(
    state_dir: Path,
    *,
    token_file: str | None = None,
    env_token: str | None = None,
    rotate: bool = False,
) -> tuple[str, str | None, str]:
    """(token hash, new token to show once or None, where the token came from).

    In order: --token-file, VTPU_TOKEN (a token in clear, hashed into access_token.sha256), the
    stored access_token.sha256 (as provisioning writes it), else a new token (standalone use;
    --rotate-token forces one). The clear token is never written anywhere."""
    if token_file:
        token = read_secret_file(Path(token_file).expanduser(), "access token")
        return hash_token(token), None, f"the one in {token_file}"
    if env_token is not None:
        if len(env_token) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"VTPU_TOKEN is too short: use at least {MIN_SECRET_CHARS} characters"
            )
        return hash_token(env_token), None, "VTPU_TOKEN"
    stored = None if rotate else read_token_hash(state_dir)
    if stored is None and not rotate:
        legacy = load_saved_config(state_dir).get("token_sha256")  # before access_token.sha256
        if isinstance(legacy, str) and SHA256_HEX.fullmatch(legacy):
            stored = legacy
    if stored:
        return stored, None, "the one already configured"
    token = secrets.token_urlsafe(32)
    return hash_token(token), token, "new"


class AccessToken:
    """The access token's hash, checked in constant time, replaceable while the agent runs."""

    def __init__(self, state_dir: Path, token_hash: str) -> None:
        self.state_dir = state_dir
        self._hash = token_hash
        self._lock = threading.Lock()

    @property
    def sha256(self) -> str:
        return self._hash

    def check(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(hash_token(given.strip()), self._hash)

    def rotate(self, token_hash: str) -> None:
        """Replace the hash on disk then in memory: the old token stops working at once."""
        if not isinstance(token_hash, str) or not SHA256_HEX.fullmatch(token_hash):
            raise ValueError("'token_sha256' must be 64 lowercase hex characters (a sha256 digest)")
        with self._lock:
            write_token_hash(self.state_dir, token_hash)
            update_saved_config(self.state_dir, token_sha256=token_hash)
            self._hash = token_hash


class ScrapeToken:
    """The fleet's scrape token (Prometheus), as its SHA-256 from the control plane's heartbeat
    replies: it opens GET /metrics and nothing else. None until the control plane sends one."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SCRAPE_TOKEN_FILE
        self._lock = threading.Lock()
        self._hash: str | None = None
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            log.warning("ignoring unreadable %s (%s)", self.path, exc)
            text = ""
        if text and SHA256_HEX.fullmatch(text):
            self._hash = text
        elif text:
            log.warning("ignoring %s: not a sha256 hex digest", self.path)

    @property
    def sha256(self) -> str | None:
        return self._hash

    def check(self, header: str | None) -> bool:
        expected = self._hash
        if not header or expected is None:
            return False
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(hash_token(given.strip()), expected)

    def update(self, token_hash: str | None) -> bool:
        """Store a new hash (None: no scrape token any more); True when it changed."""
        if token_hash is not None and not SHA256_HEX.fullmatch(token_hash):
            raise ValueError("a scrape-token hash is 64 lowercase hex characters")
        with self._lock:
            if token_hash == self._hash:
                return False
            if token_hash is None:
                self.path.unlink(missing_ok=True)
            else:
                write_private(self.path, token_hash + "\n")
            self._hash = token_hash
            return True


# ---------------------------------------------------------------------------------------------
# Actions done, remembered across restarts


class ActionStore:
    """Completed action ids with their result records, newest last, bounded, in actions.json.

    An action id the control plane sends again is never applied twice: its stored result is
    reported again instead."""

    def __init__(self, state_dir: Path, limit: int = MAX_REMEMBERED_ACTIONS) -> None:
        self.path = state_dir / ACTIONS_FILE
        self.limit = limit
        self._lock = threading.Lock()
        self._done: collections.OrderedDict[str, dict] = collections.OrderedDict()
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            for record in doc.get("actions", []):
                self._done[str(record["action_id"])] = record
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (%s); starting a new one", self.path, exc)

    def get(self, action_id: str) -> dict | None:
        with self._lock:
            return self._done.get(action_id)

    def record(self, record: dict) -> None:
        with self._lock:
            self._done[str(record["action_id"])] = record
            while len(self._done) > self.limit:
                self._done.popitem(last=False)
            text = json.dumps({"actions": list(self._done.values())}) + "\n"
            write_private(self.path, text)
