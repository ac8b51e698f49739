"""A benchmark (not a test) of the monitoring path at fleet scale, on PostgreSQL.

    scripts/bench-monitoring [--nodes 1000] [--duration 20] [--concurrency 16] [--keep]

Makes a database of its own next to DATABASE_URL's (`vtpu_bench`, dropped at the end unless
--keep), migrates it and fills it with a simulated fleet: accounts, hosts, nodes with node
secrets (their SHA-256 stored, as provisioning does), months of transitions and the telemetry a
real agent sends (vtpu.telemetry's snapshot). Then:

- ingest: gunicorn as production runs it (controlplane.stack) against that database, and a
  separate load-generator process (monitoring.loadgen) posting heartbeats with telemetry for a
  fixed time: heartbeats per second, p50/p99 latency, errors;
- cycle: each periodic task that walks the fleet (controlplane.schedules), the SLA month close,
  the benchmark schedule (when monitoring.benchmarks exists) and one /metrics scrape, each timed
  in this process over the same arranged fleet several times: median seconds and query count.

Targets (issue 7): ingest at least 1,000 nodes beating every 15 s (67/s; aim for 300/s), and one
cycle over 1,000 nodes under 5 s. The private Redis, the stand-in agents that answer the
telemetry poll and the web server are this command's own and stop with it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

INGEST_TARGET_PER_SECOND = 67  # 1,000 nodes every 15 s
INGEST_AIM_PER_SECOND = 300
CYCLE_TARGET_SECONDS = 5.0
PLATFORM_DIR = Path(__file__).resolve().parents[3]


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it (what `vtpu info` falls back to)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown (no /proc/cpuinfo)"


def real_snapshot() -> dict:
    """What this machine's agent would send now (vtpu.telemetry's own snapshot, so the shape
    cannot drift from the runtime's)."""
    from vtpu.telemetry import Telemetry

    return json.loads(json.dumps(Telemetry(tdp_watts=65.0).snapshot()))


def agent_telemetry(snapshot: dict, index: int) -> dict:
    """A real snapshot with the figures an agent that has run work reports, varied per node."""
    snapshot = json.loads(json.dumps(snapshot))
    spread = 1 + (index % 17) / 100
    figures = {
        "ops_per_cycle": 3.1 * spread,
        "throughput_gops": 41.5 * spread,
        "power_watts": 48.0 + index % 9,
        "mops_per_watt": 41.5e3 * spread / (48.0 + index % 9),
        "ops": 4_150_000_000_000 + index,
        "uptime_seconds": 86_400.0 + index,
    }
    snapshot.update(figures)
    snapshot["cache_hit_rate"] = {"L1": 0.97, "L2": 0.9, "L3": 0.71, "combined": 0.95}
    snapshot["ppt_hit_rate"] = {"combined": 0.99}
    for view in ("window", "lifetime"):
        snapshot[view].update(
            {k: figures[k] for k in ("ops_per_cycle", "throughput_gops", "mops_per_watt")}
        )
    return snapshot


class StandInAgents:
    """Answers the control plane's health check and telemetry poll for every simulated node
    (agent_url = http://127.0.0.1:PORT/<node id>), from a process of its own: one small asyncio
    server, so that polling 1,000 nodes measures the control plane's side, not 1,000 agents
    (over loopback: a real fleet adds each agent's network round trips)."""

    def __init__(self, telemetry: dict) -> None:
        self.body = json.dumps(telemetry).encode()
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.process = multiprocessing.get_context("fork").Process(target=self._serve, daemon=True)

    def _serve(self) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                node_id, _, path = target.lstrip("/").partition("/")
                if path == "vTPU/health":
                    reply = json.dumps({"status": "ok", "node_id": node_id}).encode()
                elif path == "vTPU/telemetry":
                    reply = self.body
                else:
                    reply = b""
                status = b"200 OK" if reply else b"404 Not Found"
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(reply) + reply
                )
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, IndexError):
                pass
            finally:
                writer.close()

        async def main() -> None:
            server = await asyncio.start_server(answer, sock=self.socket, backlog=1024)
            await server.serve_forever()

        asyncio.run(main())

    def __enter__(self) -> StandInAgents:
        connections.close_all()  # the child must not share this process's database sockets
        self.process.start()
        self.socket.close()  # the child serves; this process keeps no copy
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)


class Fleet:
    """The simulated fleet, and the arrangement each cycle repeat starts from."""

    def __init__(self, nodes: int, agents_url: str) -> None:
        self.size = nodes
        self.agents_url = agents_url
        self.beats: list[dict] = []
        self.silent: list = []  # ready, but no heartbeat for a minute: mark_silent moves them
        self.long_degraded: list = []  # degraded an hour ago: repair_dead_agents acts
        self.vanished: list = []  # enrolled, deleted two days ago: terminated by the sweep

    def create(self) -> None:
        from accounts.models import Account
        from fleet.models import Host, Node, NodeState, TelemetrySample
        from fleet.services.credentials import new_access_token, new_secret

        now = timezone.now()
        accounts = Account.objects.bulk_create(
            [Account(name=f"bench-{i:03d}", node_quota=100) for i in range(max(1, self.size // 10))]
        )
        hosts = Host.objects.bulk_create(
            [
                Host(name=f"bench-host-{i}", address=f"10.8.0.{i + 1}", capacity=200)
                for i in range(max(1, self.size // 125))
            ]
        )
        snapshot = real_snapshot()
        telemetry = [agent_telemetry(snapshot, i) for i in range(self.size)]
        rows, secrets = [], []
        for i in range(self.size):
            node_id = uuid.uuid4()
            secret, digest = new_secret()
            enrolled = i % 5 == 4  # one node in five is a customer's own machine
            host = None if enrolled else hosts[i % len(hosts)]
            rows.append(
                Node(
                    id=node_id,
                    account=accounts[i % len(accounts)],
                    name=f"node-{i:04d}",
                    kind=Node.Kind.ENROLLED if enrolled else Node.Kind.PROVISIONED,
                    host=host,
                    state=NodeState.READY,
                    agent_port=None if enrolled else 18000 + i,
                    agent_url=f"{self.agents_url}/{node_id}",
                    secret_sha256=digest,
                    last_heartbeat_at=now,
                    last_seen_at=now,
                    version="0.1.0",
                    last_telemetry=telemetry[i],
                    **new_access_token(),
                )
            )
            secrets.append(secret)
        nodes = Node.objects.bulk_create(rows)
        self.nodes = nodes
        self._history(nodes, now)
        # Telemetry a week and a day old, for prune_history to drop.
        old = [TelemetrySample(node=node, data=telemetry[0]) for node in nodes for _ in range(5)]
        TelemetrySample.objects.bulk_create(old, batch_size=1000)
        TelemetrySample.objects.update(created=now - timedelta(days=8))
        self.beats = [
            {
                "secret": secret,
                "address": f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}",
                "body": json.dumps(
                    {
                        "node_id": str(node.pk),
                        "version": "0.1.0",
                        "agent_url": f"{self.agents_url}/{node.pk}"
                        if node.host_id is None
                        else None,
                        "telemetry": t,
                        "results": [],
                    }
                ),
            }
            for i, (node, secret, t) in enumerate(zip(nodes, secrets, telemetry, strict=True))
        ]
        provisioned = [n for n in nodes if n.kind == Node.Kind.PROVISIONED]
        enrolled = [n for n in nodes if n.kind == Node.Kind.ENROLLED]
        self.silent = provisioned[: self.size // 20]
        self.long_degraded = provisioned[self.size // 20 : self.size // 20 + self.size // 50]
        self.vanished = enrolled[: self.size // 50]

    def _history(self, nodes: list, now) -> None:
        """Each node born 75 days ago; one in ten down 20-80 minutes last month (an SLA credit);
        one in five down 5 minutes three days ago (its 30-day uptime)."""
        from fleet.models import NodeState, NodeTransition
        from monitoring.uptime import month_bounds, previous_month

        S = NodeState
        born = now - timedelta(days=75)
        last_month, _ = month_bounds(previous_month(now))
        rows: list[tuple] = []
        for i, node in enumerate(nodes):
            rows += [
                (node, "", S.REQUESTED, "requested", born),
                (node, S.REQUESTED, S.PROVISIONING, "provisioning job started", born),
                (node, S.PROVISIONING, S.READY, "first heartbeat", born + timedelta(minutes=3)),
            ]
            if i % 10 == 0:
                down = last_month + timedelta(days=3 + i % 20, hours=i % 24)
                rows += [
                    (node, S.READY, S.DEGRADED, "no heartbeat for 45 s", down),
                    (node, S.DEGRADED, S.READY, "heartbeat received again",
                     down + timedelta(minutes=20 + i % 61)),
                ]  # fmt: skip
            if i % 5 == 0:
                down = now - timedelta(days=3, minutes=i % 600)
                rows += [
                    (node, S.READY, S.DEGRADED, "health check failed: timed out", down),
                    (node, S.DEGRADED, S.READY, "health check answered again",
                     down + timedelta(minutes=5)),
                ]  # fmt: skip
        made = NodeTransition.objects.bulk_create(
            [NodeTransition(node=n, from_state=f, to_state=t, cause=c) for n, f, t, c, _ in rows],
            batch_size=1000,
        )
        for transition, row in zip(made, rows, strict=True):
            transition.created = row[4]
        NodeTransition.objects.bulk_update(made, ["created"], batch_size=1000)

    def arrange(self) -> None:
        """The fleet as each cycle repeat finds it: 5 % of nodes silent for a minute (a host
        lost), 2 % degraded for an hour with no job (repairs due), 2 % of enrolled nodes deleted
        two days ago, a week-old telemetry backlog, last month not closed yet, no node
        benchmarked yet."""
        from fleet.models import (
            Node,
            NodeAction,
            NodeState,
            NodeTransition,
            ProvisioningJob,
            TelemetrySample,
        )
        from monitoring.models import BenchmarkRun, SlaCredit, SlaMonthClosed

        S = NodeState
        now = timezone.now()
        arranged = [n.pk for n in self.silent + self.long_degraded + self.vanished]
        started = getattr(self, "arranged_at", None)
        if started is not None:
            NodeTransition.objects.filter(node_id__in=arranged, created__gte=started).delete()
            NodeTransition.objects.filter(node_id__in=arranged, cause="bench").delete()
            ProvisioningJob.objects.filter(node_id__in=arranged).delete()
        self.arranged_at = now
        Node.objects.filter(pk__in=[n.pk for n in self.silent]).update(
            state=S.READY, last_seen_at=now - timedelta(minutes=1), updated=now
        )
        hour_ago = now - timedelta(hours=1)
        Node.objects.filter(pk__in=[n.pk for n in self.long_degraded]).update(
            state=S.DEGRADED, last_seen_at=hour_ago, updated=hour_ago
        )
        went = NodeTransition.objects.bulk_create(
            [
                NodeTransition(node=n, from_state=S.READY, to_state=S.DEGRADED, cause="bench")
                for n in self.long_degraded
            ]
        )
        NodeTransition.objects.filter(pk__in=[t.pk for t in went]).update(created=hour_ago)
        Node.objects.filter(pk__in=[n.pk for n in self.vanished]).update(
            state=S.DEPROVISIONING, delete_requested_at=now - timedelta(days=2)
        )
        if not TelemetrySample.objects.filter(created__lt=now - timedelta(days=7)).exists():
            TelemetrySample.objects.bulk_create(
                [TelemetrySample(node_id=n.pk, data={}) for n in self.nodes for _ in range(5)],
                batch_size=1000,
            )
            TelemetrySample.objects.filter(created__gte=now).update(created=now - timedelta(days=8))
        SlaCredit.objects.all().delete()
        SlaMonthClosed.objects.all().delete()
        # Every node due for its first benchmark: the schedule's largest cycle.
        BenchmarkRun.objects.all().delete()
        NodeAction.objects.filter(kind=NodeAction.Kind.BENCHMARK).delete()


def _optional(module: str, name: str) -> Callable[[], Any] | None:
    """monitoring's `name(now=...)` when that module has it (parts of monitoring are recent)."""
    try:
        task = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return lambda: task(now=timezone.now())


def cycle_tasks() -> list[tuple[str, Callable[[], Any] | None]]:
    """What walks the fleet periodically (controlplane.schedules), plus one /metrics scrape."""
    from fleet.services import sweeps
    from monitoring import services
    from monitoring.metrics import exposition
    from monitoring.uptime import previous_month

    def close_month() -> int:
        now = timezone.now()
        return services.sla_month_close(month=previous_month(now), now=now)

    return [
        ("mark_silent_nodes", sweeps.mark_silent_nodes),
        ("poll_nodes", sweeps.poll_nodes),
        ("fail_orphaned_jobs", sweeps.fail_orphaned_jobs),
        ("requeue_pending_jobs", sweeps.requeue_pending_jobs),
        ("repair_dead_agents", sweeps.repair_dead_agents),
        ("terminate_vanished_enrolled_nodes", sweeps.terminate_vanished_enrolled_nodes),
        ("prune_history", sweeps.prune_history),
        ("close_sla_month", close_month),
        ("benchmarks_schedule", _optional("monitoring.benchmarks", "benchmarks_schedule")),
        ("alerts_evaluate", _optional("monitoring.alerts", "alerts_evaluate")),
        ("GET /metrics", lambda: len(exposition())),
    ]


class Command(BaseCommand):
    help = (
        "Benchmark the monitoring path over a simulated fleet on PostgreSQL: heartbeat ingest"
        " through gunicorn, and the cost of each periodic sweep and of a /metrics scrape."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--nodes", type=int, default=1000)
        parser.add_argument(
            "--duration", type=float, default=20.0, help="Seconds of measured ingest."
        )
        parser.add_argument("--warmup", type=float, default=3.0)
        parser.add_argument(
            "--concurrency", type=int, default=16, help="Heartbeats in flight at once."
        )
        parser.add_argument(
            "--rate",
            type=float,
            default=0.0,
            help="Pace the ingest to this many heartbeats/s (0: as fast as it answers).",
        )
        parser.add_argument("--repeats", type=int, default=5, help="Runs of each cycle task.")
        parser.add_argument("--database", default="vtpu_bench", help="The bench's own database.")
        parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
        parser.add_argument("--skip-ingest", action="store_true")
        parser.add_argument("--skip-cycle", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        base = dict(settings.DATABASES["default"])
        if "postgresql" not in base["ENGINE"]:
            raise CommandError(
                "The benchmark runs on PostgreSQL: set DATABASE_URL=postgres://... (its server"
                " gets a database of the benchmark's own)."
            )
        if options["nodes"] < 50:
            raise CommandError("--nodes must be at least 50 (the fleet's arrangement needs it).")
        name = options["database"]
        self._create_database(name)
        try:
            self._use_database(name)
            call_command("migrate", verbosity=0, interactive=False)
            with tempfile.TemporaryDirectory(prefix="vtpu-bench-") as var:
                self._run(Path(var), name, options)
        finally:
            connections.close_all()
            if options["keep"]:
                self.stdout.write(f"kept database {name}")
            else:
                self._drop_database(name)

    # ---- the bench database --------------------------------------------------------------

    def _admin(self):
        import psycopg

        base = settings.DATABASES["default"]
        return psycopg.connect(
            dbname="postgres",
            user=base.get("USER") or None,
            password=base.get("PASSWORD") or None,
            host=base.get("HOST") or None,
            port=base.get("PORT") or None,
            autocommit=True,
        )

    def _create_database(self, name: str) -> None:
        from psycopg import sql

        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _drop_database(self, name: str) -> None:
        from psycopg import sql

        with self._admin() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _use_database(self, name: str) -> None:
        connections.close_all()
        settings.DATABASES["default"]["NAME"] = name
        connections["default"].settings_dict["NAME"] = name

    def _database_url(self, name: str) -> str:
        base = settings.DATABASES["default"]
        auth = base.get("USER") or ""
        if base.get("PASSWORD"):
            auth += f":{base['PASSWORD']}"
        host = f"{base.get('HOST') or '127.0.0.1'}:{base.get('PORT') or 5432}"
        return f"postgres://{auth + '@' if auth else ''}{host}/{name}"

    # ---- the run -------------------------------------------------------------------------

    def _run(self, var: Path, name: str, options: dict) -> None:
        from controlplane.celery import app as celery_app
        from controlplane.stack import Stack, free_port

        t0 = time.monotonic()
        stack = Stack(
            var,
            port=free_port(),
            log_to_files=True,
            env={
                "DATABASE_URL": self._database_url(name),
                "DEBUG": "false",
                "SECRET_KEY": settings.SECRET_KEY,
                "FIELD_ENCRYPTION_KEY": settings.FIELD_ENCRYPTION_KEY,
                "NUM_PROXIES": "1",  # each simulated node heartbeats from its own address
            },
        )
        stack.env.pop("REDIS_URL", None)
        stack.env.pop("CACHE_URL", None)
        stack.env.pop("SECRET_KEY_FILE", None)
        stack.env.pop("FIELD_ENCRYPTION_KEY_FILE", None)
        try:
            # Its own Redis: the repair jobs the sweeps queue must reach no real worker.
            redis_url = stack.start_private_redis()
            settings.CELERY_BROKER_URL = redis_url
            celery_app.conf.broker_url = redis_url
            with StandInAgents(agent_telemetry(real_snapshot(), 0)) as agents:
                fleet = Fleet(options["nodes"], agents.url)
                fleet.create()
                self.stdout.write(
                    f"==> {options['nodes']} nodes in database {name} "
                    f"({time.monotonic() - t0:.1f} s to set up)"
                )
                ingest = None if options["skip_ingest"] else self._ingest(stack, fleet, options)
                cycle = [] if options["skip_cycle"] else self._cycle(fleet, options["repeats"])
        finally:
            stack.stop()
        self._report(options, ingest, cycle)

    def _ingest(self, stack, fleet: Fleet, options: dict) -> dict:
        stack.start_web()
        stack.wait_for_web()
        spec = {
            "url": stack.url,
            "duration": options["duration"],
            "warmup": options["warmup"],
            "concurrency": options["concurrency"],
            "rate": options["rate"],
            "beats": fleet.beats,
        }
        spec_path = stack.var_dir / "loadgen.json"
        spec_path.write_text(json.dumps(spec))
        self.stdout.write(
            f"==> ingest: {options['concurrency']} in flight for {options['duration']:g} s"
            f" (+{options['warmup']:g} s warm-up) against gunicorn at {stack.url}"
        )
        web = stack.processes["web"].pid
        cpu_before, load_before = _group_cpu_seconds(web), os.getloadavg()[0]
        done = subprocess.run(
            [sys.executable, "-m", "monitoring.loadgen", str(spec_path)],
            cwd=PLATFORM_DIR,
            env={**os.environ, "PYTHONPATH": str(PLATFORM_DIR)},
            capture_output=True,
            text=True,
            timeout=options["duration"] + options["warmup"] + 120,
        )
        cpu = _group_cpu_seconds(web) - cpu_before
        load = (load_before, os.getloadavg()[0])
        stack.kill("web", 15)
        stack.processes.pop("web")
        if done.returncode != 0:
            raise CommandError(f"the load generator failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        beats = result["ok_with_warmup"]
        result["server_cpu_ms"] = cpu / beats * 1000 if beats else None
        result["load"] = load
        result["database_conn_max_age"] = stack.env.get("DATABASE_CONN_MAX_AGE") or str(
            settings.DATABASES["default"]["CONN_MAX_AGE"]
        )
        return result

    def _cycle(self, fleet: Fleet, repeats: int) -> list[dict]:
        self.stdout.write(f"==> cycle: each task {repeats} times over the arranged fleet")
        logging.disable(logging.INFO)  # the sweeps' own lines (repairs, alerts) would drown this
        try:
            return self._time_tasks(fleet, repeats)
        finally:
            logging.disable(logging.NOTSET)

    def _time_tasks(self, fleet: Fleet, repeats: int) -> list[dict]:
        rows = []
        for label, task in cycle_tasks():
            if task is None:
                rows.append({"task": label, "note": "not available"})
                continue
            seconds, cpu, queries, result = [], [], [], None
            try:
                for _ in range(repeats):
                    fleet.arrange()
                    connection.queries_log.clear()  # its bound (9,000) applies to each run
                    with CaptureQueriesContext(connection) as captured:
                        began, began_cpu = time.perf_counter(), time.process_time()
                        result = task()
                        seconds.append(time.perf_counter() - began)
                        cpu.append(time.process_time() - began_cpu)
                    queries.append(len(captured.captured_queries))
            except Exception as exc:  # one broken task must not hide the others' figures
                rows.append({"task": label, "note": f"failed: {type(exc).__name__}: {exc}"})
                continue
            rows.append(
                {
                    "task": label,
                    "median_s": statistics.median(seconds),
                    "max_s": max(seconds),
                    "cpu_s": statistics.median(cpu),
                    "queries": int(statistics.median(queries)),
                    "result": _short(result),
                }
            )
        return rows

    # ---- the report ----------------------------------------------------------------------

    def _report(self, options: dict, ingest: dict | None, cycle: list[dict]) -> None:
        out = self.stdout.write
        out("")
        out(f"vTPU monitoring benchmark: {options['nodes']} nodes, PostgreSQL, {_machine()}")
        verdicts = []
        if ingest is not None:
            errors = sum(ingest["errors"].values())
            rate = ingest["per_second"] or 0.0
            out("")
            out("ingest: POST /api/v1/agent/heartbeat with telemetry (gunicorn 2 workers x 4"
                f" threads, DATABASE_CONN_MAX_AGE={ingest['database_conn_max_age']})")  # fmt: skip
            out(f"  {'heartbeats/s':<22}{rate:>10.1f}")
            out(f"  {'answered (200)':<22}{ingest['ok']:>10d}   in {ingest['seconds']:.1f} s,"
                f" {ingest['concurrency']} in flight"
                + (f", paced at {ingest['rate']:g}/s" if ingest["rate"] else ""))  # fmt: skip
            for label, key in (("p50 latency", "p50_ms"), ("p99 latency", "p99_ms")):
                value = ingest[key]
                out(f"  {label:<22}{'-' if value is None else f'{value:.1f}':>10} ms")
            out(f"  {'errors':<22}{errors:>10d}   {ingest['errors'] or ''}")
            cpu_ms = ingest["server_cpu_ms"]
            out(f"  {'gunicorn CPU/beat':<22}{'-' if cpu_ms is None else f'{cpu_ms:.2f}':>10} ms"
                "   (web workers' user+system time / heartbeats answered)")  # fmt: skip
            out(f"  {'load average':<22}{ingest['load'][0]:>10.2f}   -> {ingest['load'][1]:.2f}"
                f" at the end (this bench's processes included; {os.cpu_count()} CPUs)")  # fmt: skip
            ok = errors == 0 and rate >= INGEST_TARGET_PER_SECOND
            verdicts.append(
                f"ingest {rate:.0f}/s {'meets' if ok else 'MISSES'} the target"
                f" ({INGEST_TARGET_PER_SECOND}/s, aim {INGEST_AIM_PER_SECOND}/s"
                f"{', with errors' if errors else ''})"
            )
        if cycle:
            out("")
            out(f"cycle over {options['nodes']} nodes (median of {options['repeats']} runs each)")
            out(f"  {'task':<36}{'median s':>10}{'max s':>10}{'CPU s':>10}{'queries':>10}  result")
            total = 0.0
            for row in cycle:
                if "note" in row:
                    out(f"  {row['task']:<36}{row['note'][:120]}")
                    continue
                total += row["median_s"]
                out(f"  {row['task']:<36}{row['median_s']:>10.3f}{row['max_s']:>10.3f}"
                    f"{row['cpu_s']:>10.3f}{row['queries']:>10d}  {row['result']}")  # fmt: skip
            out(f"  {'one whole cycle (sum)':<36}{total:>10.3f}")
            slowest = max((r for r in cycle if "median_s" in r), key=lambda r: r["median_s"])
            ok = total < CYCLE_TARGET_SECONDS
            verdicts.append(
                f"cycle {total:.2f} s {'meets' if ok else 'MISSES'} the target"
                f" (< {CYCLE_TARGET_SECONDS:g} s; slowest: {slowest['task']}"
                f" {slowest['median_s']:.2f} s)"
            )
        out("")
        out("verdict: " + "; ".join(verdicts))


def _group_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (gunicorn's master and its
    workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        # after the command: state ppid ... utime (12th) stime (13th), counted from state
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _short(result: Any) -> str:
    text = json.dumps(result, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} CPUs"
