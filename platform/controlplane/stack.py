"""The whole platform on one machine: Redis, migrations, web, Celery workers and beat.

Used by the README's run command (`python -m controlplane.stack`, via scripts/run) and by the
end-to-end tests, so what a developer runs is what the tests exercise. Redis: REDIS_URL when
set, else the one on 127.0.0.1:6379 when it answers, else a private redis-server started here.
Database: DATABASE_URL when set, else SQLite under the var dir. Secrets: the caller's
SECRET_KEY(_FILE)/FIELD_ENCRYPTION_KEY(_FILE), else files generated once under the var dir.
Two Celery workers, one per queue (docs/architecture.md, "Queues"): `worker` runs provisioning
jobs, `housekeeping` the sweeps. Ctrl-C (or stop()) stops every process this started, gently
first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from controlplane.devsecrets import dev_secret_path, ensure_dev_secrets

REPO = Path(__file__).resolve().parent.parent.parent
MANAGE = REPO / "manage.py"


LOCAL_STRIPE_SECRET_KEY = "sk_test_local"  # localstripe takes any key; nothing real is charged
LOCAL_STRIPE_PUBLISHABLE_KEY = "pk_test_local"


def _stripe_answers(base: str) -> bool:
    request = urllib.request.Request(
        f"{base}/v1/customers?limit=1",
        headers={"Authorization": f"Bearer {LOCAL_STRIPE_SECRET_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait(predicate, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {process.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


class Stack:
    """Processes of one control plane. start() returns once the web app answers."""

    def __init__(
        self,
        var_dir: Path,
        *,
        port: int = 8000,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_to_files: bool = False,
        worker_concurrency: int = 2,
        beat: bool = True,
        local_stripe: bool = False,
        stripe_from_scratch: bool = False,
    ) -> None:
        self.var_dir = Path(var_dir)
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.log_to_files = log_to_files
        self.worker_concurrency = worker_concurrency
        self.beat = beat
        self.local_stripe = local_stripe
        self.stripe_from_scratch = stripe_from_scratch  # tests: ignore the state file
        self.stripe_base: str | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {
            **os.environ,
            "VTPU_VAR_DIR": str(self.var_dir),
            "PUBLIC_URL": self.url,
            "PYTHONUNBUFFERED": "1",
            # ansible-playbook and celery live next to this interpreter
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        if not any(self.env.get(k) for k in ("SECRET_KEY", "SECRET_KEY_FILE")):
            self.env.update(ensure_dev_secrets(self.var_dir))
        if not any(self.env.get(k) for k in ("METRICS_TOKEN", "METRICS_TOKEN_FILE")):
            secrets_dir = self.var_dir / "secrets"
            self.env["METRICS_TOKEN_FILE"] = str(dev_secret_path(secrets_dir, "METRICS_TOKEN"))
        if not any(self.env.get(k) for k in ("AGENT_SCRAPE_TOKEN", "AGENT_SCRAPE_TOKEN_FILE")):
            self.env["AGENT_SCRAPE_TOKEN_FILE"] = str(
                dev_secret_path(self.var_dir / "secrets", "AGENT_SCRAPE_TOKEN")
            )

    # ---- processes -----------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = None
        if self.log_to_files:
            (self.var_dir / "logs").mkdir(parents=True, exist_ok=True)
            out = open(self.var_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            argv,
            cwd=REPO / "platform",
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # stop() signals the whole group (ansible children too)
        )
        self.processes[name] = process
        return process

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(MANAGE), *args],
            cwd=REPO,
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
        )

    def ensure_redis(self) -> str:
        if self.env.get("REDIS_URL"):
            return self.env["REDIS_URL"]
        if _redis_answers("127.0.0.1", 6379):
            self.env["REDIS_URL"] = "redis://127.0.0.1:6379/0"
            return self.env["REDIS_URL"]
        return self.start_private_redis()

    def start_private_redis(self, port: int | None = None) -> str:
        """A redis-server of this stack's own (on `port`, e.g. to bring one back after a test
        stopped it)."""
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("no Redis: set REDIS_URL or install redis-server")
        port = port or free_port()
        data = self.var_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        process = self._spawn(
            "redis",
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(data)],
        )  # fmt: skip
        _wait(lambda: _redis_answers("127.0.0.1", port), "redis-server", 20, process)
        self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        return self.env["REDIS_URL"]

    def start_local_stripe(self) -> str | None:
        """Test mode, the run command's embedded default: without STRIPE_SECRET_KEY, a local Stripe
        API server (localstripe, ../shared/STRIPE.md) of this stack's own, and the keys that
        point billing at it. Its state persists across starts in its own file under /tmp; its
        webhook registration does not (register_stripe_webhook, after the web app is up)."""
        if any(self.env.get(k) for k in ("STRIPE_SECRET_KEY", "STRIPE_SECRET_KEY_FILE")):
            return None  # real Stripe (or another server): the operator's keys decide
        server = Path(sys.executable).with_name("localstripe")
        if not server.exists():
            print("warning: no localstripe next to this Python: billing is off", file=sys.stderr)
            return None
        port = int(self.env.get("STRIPE_LOCAL_PORT") or free_port())
        argv = [str(server), "--port", str(port)]
        process = self._spawn("stripe", argv + ["--from-scratch"] * self.stripe_from_scratch)
        base = f"http://127.0.0.1:{port}"
        self.env.update(
            STRIPE_SECRET_KEY=LOCAL_STRIPE_SECRET_KEY,
            STRIPE_PUBLISHABLE_KEY=LOCAL_STRIPE_PUBLISHABLE_KEY,
            STRIPE_API_BASE=base,
            STRIPE_WEBHOOK_SECRET_FILE=str(
                dev_secret_path(self.var_dir / "secrets", "STRIPE_WEBHOOK_SECRET")
            ),
        )
        _wait(lambda: _stripe_answers(base), "localstripe", 30, process)
        self.stripe_base = base
        return base

    def register_stripe_webhook(self) -> None:
        """Make the local Stripe server deliver every event to this stack's webhook, signed with
        the stack's webhook secret (what a Stripe dashboard's webhook endpoint is)."""
        secret = Path(self.env["STRIPE_WEBHOOK_SECRET_FILE"]).read_text().strip()
        data = urllib.parse.urlencode(
            {"url": f"{self.url}/billing/stripe/webhook", "secret": secret}
        ).encode()
        request = urllib.request.Request(
            f"{self.stripe_base}/_config/webhooks/vtpu-run", data=data, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"localstripe refused the webhook: HTTP {response.status}")

    def start(self) -> Stack:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        if self.local_stripe:
            self.start_local_stripe()
        self.ensure_redis()
        migrate = self.manage("migrate", "--noinput", check=False)
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrate.stdout}\n{migrate.stderr}")
        self.manage("collectstatic", "--noinput", check=False)
        self.manage("sync_schedules")
        bin_dir = Path(sys.executable).parent
        self.start_web()
        self.start_worker()
        self.start_worker("housekeeping", queues="housekeeping", concurrency=1)
        if self.beat:
            self._spawn(
                "beat",
                [str(bin_dir / "celery"), "-A", "controlplane", "beat", "--loglevel", "INFO"],
            )  # fmt: skip
        self.wait_for_web()
        if self.stripe_base:
            self.register_stripe_webhook()
            plans = self.manage("sync_plans", check=False)
            if plans.returncode != 0:
                raise RuntimeError(f"sync_plans failed:\n{plans.stdout}\n{plans.stderr}")
        return self

    def start_web(self) -> subprocess.Popen:
        """gunicorn as production runs it (also alone: the monitoring benchmark drives it)."""
        bin_dir = Path(sys.executable).parent
        return self._spawn(
            "web",
            [str(bin_dir / "gunicorn"), "controlplane.wsgi:application",
             "--bind", f"{self.host}:{self.port}", "--workers", "2", "--threads", "4",
             "--timeout", "120", "--access-logfile", "-",
             "--logger-class", "controlplane.gunicorn_logging.RedactingLogger"],
        )  # fmt: skip

    def wait_for_web(self, timeout: float = 60) -> None:
        _wait(self._web_answers, "web app", timeout, self.processes["web"])

    def start_worker(
        self, name: str = "worker", *, queues: str = "provisioning", concurrency: int | None = None
    ) -> subprocess.Popen:
        bin_dir = Path(sys.executable).parent
        return self._spawn(
            name,
            [str(bin_dir / "celery"), "-A", "controlplane", "worker", "--loglevel", "INFO",
             "--queues", queues,
             "--concurrency", str(concurrency or self.worker_concurrency),
             "--hostname", f"{name}@%h", "--without-mingle", "--without-gossip"],
        )  # fmt: skip

    def _web_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/schema/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process's whole group (a worker and its ansible children)."""
        process = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(30)

    def stop(self, timeout: float = 20) -> None:
        for process in reversed(list(self.processes.values())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self.processes.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        try:
            yield self.start()
        finally:
            self.stop()


def main() -> int:
    port = int(os.environ.get("PORT", "8000"))
    # A local demo: webhooks to this machine's own receivers are allowed (production refuses
    # private addresses); mails are files under var/mail/; the demo node serves embeddings
    # (its role installs and preloads the sentence encoder; NODE_MODELS="" leaves it out).
    local = {
        "WEBHOOK_ALLOW_PRIVATE": os.environ.get("WEBHOOK_ALLOW_PRIVATE", "true"),
        "NODE_MODELS": os.environ.get("NODE_MODELS", "all-MiniLM-L6-v2"),
    }
    stack = Stack(
        Path(os.environ.get("VTPU_VAR_DIR", REPO / "var")), port=port, env=local, local_stripe=True
    )
    print(f"==> starting the control plane on {stack.url} (Ctrl-C stops everything)", flush=True)
    # Ctrl-C and SIGTERM both stop everything, even when started from a shell that set SIGINT
    # to be ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stack.start()
        demo = subprocess.run([sys.executable, str(MANAGE), "bootstrap_demo"], env=stack.env)
        if demo.returncode != 0:
            raise RuntimeError("bootstrap_demo failed (its error is above)")
        print(f"==> the platform is up: {stack.url}/admin/  API {stack.url}/api/v1/", flush=True)
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(1)
        dead = [n for n, p in stack.processes.items() if p.poll() is not None]
        print(f"error: {', '.join(dead)} stopped; shutting down", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n==> stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        stop_local_agents(stack.var_dir / "nodes")


def stop_local_agents(nodes_dir: Path) -> None:
    """The demo's local node agents run as daemons; the run command stops them with the rest
    (the next start provisions them again: the playbook is idempotent)."""
    for pid_file in nodes_dir.glob("*/agent.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            print(f"==> stopped node agent {pid_file.parent.name} (pid {pid})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
