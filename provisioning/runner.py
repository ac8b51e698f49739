"""Run one provisioning playbook against one host with ansible-runner, after AWX's job runner.

Each job gets a private data dir (mkdtemp, 0700) holding the inventory, env/settings with the
job and idle timeouts, env/extravars, the SSH key and the host's pinned SSH host keys (0600
each). Events reach the caller in batches, secrets redacted; the caller may cancel at any time;
the job always ends with a final status and a sentence saying what happened. The dir is removed afterwards unless
VTPU_KEEP_JOB_DIRS=1 (for debugging: it holds secrets).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROVISIONING_DIR = Path(__file__).resolve().parent
PLAYBOOKS_DIR = PROVISIONING_DIR / "playbooks"
ROLES_DIR = PROVISIONING_DIR / "roles"
ANSIBLE_CFG = PROVISIONING_DIR / "ansible.cfg"

REDACTED = "********"
EVENT_BATCH_SIZE = 20
EVENT_BATCH_SECONDS = 0.5
# How long ansible-runner waits for output before it looks at cancel and timeouts again.
POLL_SECONDS = 1
STDOUT_TAIL_LINES = 15

# SSH hosts are pinned: a job connects only to the host key recorded when the host was added
# (scan_host_keys), never to whatever key answers. The system's known_hosts files are ignored.
SSH_HOST_KEY_ARGS = "-o StrictHostKeyChecking=yes -o GlobalKnownHostsFile=/dev/null"
HOST_KEY_SCAN_SECONDS = 10


class HostKeyUnavailable(Exception):
    """No SSH host key could be read from a host (the message says why)."""


def scan_host_keys(address: str, port: int = 22, timeout: int = HOST_KEY_SCAN_SECONDS) -> str:
    """The host's SSH public keys in known_hosts format (`ssh-keyscan -p PORT ADDRESS`), to be
    recorded when a host is added. Trust on first use: compare them with the host's own
    (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there) when the network is not trusted."""
    keyscan = shutil.which("ssh-keyscan")
    if keyscan is None:
        raise HostKeyUnavailable(
            "ssh-keyscan is not installed here (apt-get install openssh-client)"
        )
    try:
        scan = subprocess.run(
            [keyscan, "-T", str(timeout), "-p", str(port), "--", address],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
    except subprocess.TimeoutExpired:
        raise HostKeyUnavailable(
            f"{address}:{port} sent no SSH host key within {timeout} s"
        ) from None
    keys = "\n".join(
        line for line in scan.stdout.splitlines() if line.strip() and not line.startswith("#")
    )
    if not keys:
        said = " / ".join(ln for ln in scan.stderr.splitlines() if not ln.startswith("#"))
        raise HostKeyUnavailable(
            f"no SSH host key could be read from {address}:{port} (ssh-keyscan exit"
            f" {scan.returncode}{': ' + said if said else ''}); is sshd running there and"
            f" reachable from this machine?"
        )
    return keys + "\n"


@dataclass(frozen=True)
class Target:
    name: str  # inventory hostname, e.g. "node-<uuid8>"
    connection: str  # "local" or "ssh"
    address: str | None = None  # ssh host/IP
    port: int = 22
    user: str | None = None
    private_key: str | None = None  # PEM text; written 0600 into the private data dir only
    # The host's SSH host keys in known_hosts format (scan_host_keys); an ssh job refuses to
    # run without them.
    known_hosts: str | None = None
    python: str = "python3"  # interpreter on the target for Ansible and for the node venv


@dataclass(frozen=True)
class JobSpec:
    playbook: str  # "provision.yml" / "deprovision.yml" (under playbooks/), or an absolute path
    target: Target
    extravars: dict
    secret_vars: frozenset[str]  # extravar names that are secrets (never in events/stdout)
    job_timeout: int = 900
    idle_timeout: int = 300


@dataclass(frozen=True)
class JobResult:
    status: str  # "successful" | "failed" | "canceled"
    rc: int | None
    explanation: str  # for failed/canceled, a sentence for people
    stdout: str  # whole stdout, secrets redacted


EventSink = Callable[[list[dict]], None]


def run_job(
    spec: JobSpec,
    *,
    on_events: EventSink,
    cancelled: Callable[[], bool] = lambda: False,
    on_start: Callable[[int], None] | None = None,
) -> JobResult:
    """Run spec.playbook against spec.target and return how it ended.

    Raises ValueError for a malformed spec (a caller's bug); everything that goes wrong on the
    Ansible side, including a crash of ansible-runner itself, is a failed JobResult."""
    playbook = _resolve_playbook(spec.playbook)
    _check_target(spec.target)
    target = spec.target
    if target.connection == "ssh" and not (target.known_hosts or "").strip():
        why = (
            f"host key not recorded for {target.address}: the control plane only connects to a"
            f" host whose SSH host key it knows. Record it (create_host --ssh reads it with"
            f" ssh-keyscan, or give --known-hosts-file), then run the job again."
        )
        return JobResult("failed", None, why, "")
    job_dir = Path(tempfile.mkdtemp(prefix="vtpu-job-"))  # mkdtemp makes it 0700
    job = _Job(spec, job_dir, on_events, cancelled, on_start)
    try:
        return job.run(playbook)
    finally:
        if os.environ.get("VTPU_KEEP_JOB_DIRS") == "1":
            log.warning("keeping job dir %s (VTPU_KEEP_JOB_DIRS=1); it holds secrets", job_dir)
        else:
            shutil.rmtree(job_dir, ignore_errors=True)


def _resolve_playbook(playbook: str) -> Path:
    path = Path(playbook)
    if not path.is_absolute():
        path = PLAYBOOKS_DIR / playbook
    if not path.is_file():
        raise ValueError(f"playbook {playbook!r} not found (looked at {path})")
    return path


def _check_target(target: Target) -> None:
    if target.connection not in ("local", "ssh"):
        raise ValueError(f"target {target.name}: connection must be 'local' or 'ssh'")
    if target.connection == "ssh" and not target.address:
        raise ValueError(f"target {target.name}: an ssh target needs an address")


class _Job:
    def __init__(
        self,
        spec: JobSpec,
        job_dir: Path,
        on_events: EventSink,
        cancelled: Callable[[], bool],
        on_start: Callable[[int], None] | None,
    ) -> None:
        self.spec = spec
        self.job_dir = job_dir
        self.on_events = on_events
        self.cancelled = cancelled
        self.on_start = on_start
        secrets = [str(spec.extravars[name]) for name in spec.secret_vars if name in spec.extravars]
        if spec.target.private_key:
            secrets.append(spec.target.private_key.strip())
        # Longest first, so a secret containing another is redacted whole.
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)
        self.batch: list[dict] = []
        self.last_flush = time.monotonic()
        self.sink_error: str | None = None
        self.pid: int | None = None
        self.worker_sessions: set[int] = set()
        self.unreachable: str | None = None
        self.task_failure: str | None = None
        self.started = 0.0

    # -- the private data dir ------------------------------------------------------------------

    def prepare(self) -> None:
        spec, target = self.spec, self.spec.target
        env = self.job_dir / "env"
        inventory = self.job_dir / "inventory"
        env.mkdir(mode=0o700)
        inventory.mkdir(mode=0o700)
        host: dict[str, Any] = {"ansible_python_interpreter": target.python}
        if target.connection == "local":
            host["ansible_connection"] = "local"
        else:
            known_hosts = self.job_dir / "known_hosts"
            _write_private(known_hosts, target.known_hosts.strip() + "\n")
            host.update(
                ansible_connection="ssh",
                ansible_host=target.address,
                ansible_port=target.port,
                # Overrides ansible.cfg's host_key_checking = False for this host.
                ansible_host_key_checking=True,
                ansible_ssh_common_args=(
                    f"{SSH_HOST_KEY_ARGS} -o UserKnownHostsFile={shlex.quote(str(known_hosts))}"
                ),
            )
            if target.user:
                host["ansible_user"] = target.user
            if target.private_key:
                key = self.job_dir / "ssh_key"
                _write_private(key, target.private_key.strip() + "\n")
                host["ansible_ssh_private_key_file"] = str(key)
        # JSON is YAML, and the yaml inventory plugin needs no quoting rules of ours.
        _write_private(
            inventory / "hosts.yml", json.dumps({"all": {"hosts": {target.name: host}}}, indent=2)
        )
        _write_private(env / "extravars", json.dumps(spec.extravars, indent=2))
        settings = {
            "job_timeout": spec.job_timeout,
            "idle_timeout": spec.idle_timeout,
            "pexpect_timeout": POLL_SECONDS,
            "suppress_ansible_output": True,
        }
        _write_private(env / "settings", json.dumps(settings))
        bin_dir = str(Path(sys.executable).parent)  # ansible-playbook lives next to our python
        envvars = {
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "/usr/bin:/bin")]),
            "ANSIBLE_CONFIG": str(ANSIBLE_CFG),
            "ANSIBLE_ROLES_PATH": str(ROLES_DIR),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.job_dir / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.job_dir / "cp"),
        }
        _write_private(env / "envvars", json.dumps(envvars))

    # -- running ----------------------------------------------------------------------------------

    def run(self, playbook: Path) -> JobResult:
        import ansible_runner

        self.started = time.monotonic()
        runner = None
        try:
            self.prepare()
            runner = ansible_runner.run(
                private_data_dir=str(self.job_dir),
                project_dir=str(PROVISIONING_DIR),
                playbook=str(playbook),
                quiet=True,
                event_handler=self.handle_event,
                cancel_callback=self.poll_cancel,
            )
        except Exception as exc:  # ansible-runner's or our own bug: still a final status
            log.exception("provisioning job on %s crashed", self.spec.target.name)
            self.kill_leftover()
            self.flush()
            return JobResult(
                "failed",
                None,
                self.redact(f"the provisioning runner crashed: {type(exc).__name__}: {exc}"),
                self.redact(self.read_stdout()),
            )
        self.flush()
        if runner.status in ("canceled", "timeout") or self.sink_error:
            self.kill_leftover()
        stdout = self.redact(self.read_stdout())
        return self.result(runner.status, runner.rc, stdout)

    def read_stdout(self) -> str:
        files = list((self.job_dir / "artifacts").glob("*/stdout"))
        return files[0].read_text(encoding="utf-8", errors="replace") if files else ""

    def result(self, status: str, rc: int | None, stdout: str) -> JobResult:
        spec = self.spec
        elapsed = time.monotonic() - self.started
        if status == "successful":
            return JobResult("successful", rc, "", stdout)
        if self.sink_error:
            why = f"the job was stopped because its events could not be stored: {self.sink_error}"
            return JobResult("failed", rc, self.redact(why), stdout)
        if status == "canceled":
            return JobResult("canceled", rc, f"canceled on request after {elapsed:.0f} s", stdout)
        if status == "timeout":
            if elapsed >= spec.job_timeout:
                why = (
                    f"the job ran longer than its limit of {spec.job_timeout} s and was stopped "
                    f"(job timeout)"
                )
            else:
                why = (
                    f"the job printed nothing for {spec.idle_timeout} s and was stopped "
                    f"(idle timeout)"
                )
            return JobResult("failed", rc, why, stdout)
        if self.unreachable and "Host key verification failed" in self.unreachable:
            target = spec.target
            why = (
                f"host {target.name} ({target.address}:{target.port}) did not present the SSH"
                f" host key recorded for it (Host key verification failed), so nothing was run"
                f" there. The host was reinstalled or its keys changed, or something else"
                f" answers at that address. Check the host, then record its current host key"
                f" again."
            )
            return JobResult("failed", rc, why, stdout)
        if self.unreachable:
            return JobResult("failed", rc, self.redact(self.unreachable), stdout)
        if self.task_failure:
            return JobResult("failed", rc, self.redact(self.task_failure), stdout)
        tail = "\n".join(stdout.strip().splitlines()[-STDOUT_TAIL_LINES:])
        why = f"ansible-playbook ended with status {status} (rc {rc}) and no failed task"
        return JobResult("failed", rc, f"{why}; last output:\n{tail}", stdout)

    def poll_cancel(self) -> bool:
        if self.pid is None:
            self.pid = _find_child(str(self.job_dir))
            if self.pid is not None and self.on_start is not None:
                self.on_start(self.pid)
        if self.pid is not None:
            self.worker_sessions |= _child_sessions(self.pid)
        if self.sink_error:
            return True
        return bool(self.cancelled())

    def kill_leftover(self) -> None:
        """ansible-runner kills ansible-playbook's process group when it stops a job, but each of
        Ansible's workers runs in a session of its own, and the module it was running (e.g. a
        long pip install) would live on: kill every process still in those sessions. The agent
        is safe: it runs in a session of its own too, not a worker's."""
        import signal

        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        for pid, session in _sessions():
            if session in self.worker_sessions:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    # -- events -----------------------------------------------------------------------------------

    def handle_event(self, data: dict) -> bool:
        """Keep only what people need; returning False keeps the raw event (with module results)
        off the disk, since we have just taken from it all we keep."""
        kind = data.get("event", "")
        event_data = data.get("event_data") or {}
        host = event_data.get("host") or event_data.get("remote_addr")
        task = event_data.get("task") or None
        res = event_data.get("res") if isinstance(event_data.get("res"), dict) else {}
        if kind == "runner_on_unreachable" and self.unreachable is None:
            self.unreachable = f"host {host} unreachable: {_message(res)}"
        elif (
            kind == "runner_on_failed"
            and not event_data.get("ignore_errors")
            and self.task_failure is None
        ):
            self.task_failure = f"task '{task}' failed on {host}: {_message(res)}"
        self.batch.append(
            {
                "counter": int(data.get("counter", 0)),
                "event": kind,
                "host": host,
                "task": task,
                "stdout": self.redact(data.get("stdout") or ""),
                "created": data.get("created") or "",
                "failed": kind in ("runner_on_failed", "runner_on_unreachable")
                and not event_data.get("ignore_errors"),
                "changed": bool(res.get("changed")) if kind == "runner_on_ok" else False,
            }
        )
        if (
            len(self.batch) >= EVENT_BATCH_SIZE
            or time.monotonic() - self.last_flush >= EVENT_BATCH_SECONDS
        ):
            self.flush()
        return False

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.batch or self.sink_error:
            return
        batch, self.batch = self.batch, []
        try:
            self.on_events(batch)
        except Exception as exc:  # stop the job: a log we cannot store is a job nobody can audit
            log.exception("storing provisioning events failed")
            self.sink_error = f"{type(exc).__name__}: {exc}"

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def _message(res: dict) -> str:
    msg = res.get("msg") or ""
    for stream in ("stderr", "module_stderr", "stdout", "module_stdout"):
        extra = (res.get(stream) or "").strip()
        if extra and extra not in str(msg):
            lines = extra.splitlines()[-5:]
            msg = f"{msg}; {stream}: " + " / ".join(lines) if msg else " / ".join(lines)
            break
    if not msg and "rc" in res:
        msg = f"exit code {res['rc']}"
    return str(msg).strip() or "no message"


def _find_child(job_dir: str) -> int | None:
    """The ansible-playbook process ansible-runner spawned for this job: our child whose command
    line names the job's private dir (ansible-runner does not hand out the pid)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat(entry)[1]) != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if job_dir in cmdline:
            return int(entry)
    return None


def _stat(pid: str) -> list[str]:
    """/proc/PID/stat fields after the command name: state, ppid, pgrp, session, ..."""
    with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
        return f.read().rsplit(")", 1)[1].split()


def _sessions() -> list[tuple[int, int]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append((int(entry), int(_stat(entry)[3])))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _child_sessions(parent: int) -> set[int]:
    """Session ids of parent's children (Ansible's workers, each in a session of its own)."""
    sessions = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(entry)
                if int(fields[1]) == parent:
                    sessions.add(int(fields[3]))
            except (OSError, ValueError, IndexError):
                continue
    return sessions


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
