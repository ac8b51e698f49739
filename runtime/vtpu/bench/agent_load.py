"""`vtpu bench-agent`: load an agent over loopback and measure it (a benchmark, not a test).

Starts an agent of its own (a temporary state dir, a random token) or targets --url with
--token; for 4, 16 and 64 concurrent keep-alive clients it measures requests/s and p50/p99
latency of GET /vTPU/telemetry and of a small program (a 64x64 GEMM in SIW), counting refusals
(503) and errors. Bounded: --requests per client and --seconds per cell, whichever ends first.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import secrets
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

GEMM_64 = """
.tensor a f32[64,64] random(1)
.tensor b f32[64,64] random(2)
.tensor y f32[64,64] output
D.gemm y, a, b
C.halt
"""
CASES = {
    "telemetry": ("GET", "/vTPU/telemetry", None, None),
    "gemm64 program": ("POST", "/vTPU/programs", GEMM_64.encode(), "text/plain"),
}


def _client(host: str, port: int, token: str, case: tuple, deadline: float, count: int,
            out: dict) -> None:  # fmt: skip
    method, path, body, content_type = case
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    conn = http.client.HTTPConnection(host, port, timeout=60)
    latencies, refused, errors = [], 0, 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.getheader("Connection", "").lower() == "close":
                conn.close()
        except (OSError, http.client.HTTPException):
            status = None
            conn.close()
        elapsed = time.perf_counter() - start
        if status == 200:
            latencies.append(elapsed)
        elif status == 503:
            refused += 1
        else:
            errors += 1
    conn.close()
    with out["lock"]:
        out["latencies"] += latencies
        out["refused"] += refused
        out["errors"] += errors


def measure(host: str, port: int, token: str, case: tuple, clients: int, requests: int,
            seconds: float) -> dict:  # fmt: skip
    out = {"lock": threading.Lock(), "latencies": [], "refused": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(host, port, token, case, deadline, requests, out))
        for _ in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(out["latencies"])

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None

    return {
        "clients": clients,
        "ok": len(lat),
        "refused": out["refused"],
        "errors": out["errors"],
        "rps": len(lat) / wall if wall else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(lat) * 1000 if lat else None,
    }


def _start_agent(workers: int) -> tuple[subprocess.Popen, str, str, tempfile.TemporaryDirectory]:
    tmp = tempfile.TemporaryDirectory(prefix="vtpu-bench-agent-")
    token = secrets.token_urlsafe(32)
    env = dict(os.environ, VTPU_TOKEN=token, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "vtpu", "agent", "--port", "0", "--state-dir",
               os.path.join(tmp.name, "state")]  # fmt: skip
    if workers:
        command += ["--workers", str(workers)]
    log = open(os.path.join(tmp.name, "agent.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            m = re.match(r"vTPU agent listening on (http://\S+)", line)
            if m:
                return proc, m[1], token, tmp
            if not line:
                break
    proc.kill()
    raise SystemExit(f"the agent did not start; see {tmp.name}/agent.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtpu bench-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an agent to load (loopback only); default: start one")
    parser.add_argument("--token", help="its access token (or VTPU_TOKEN)")
    parser.add_argument("--workers", type=int, default=0, help="sentrons of a started agent")
    parser.add_argument("--clients", default="4,16,64", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=200, help="requests per client at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per cell at most")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    proc = tmp = None
    if args.url:
        url = args.url
        token = args.token or os.environ.get("VTPU_TOKEN")
        if not token:
            parser.error("--url needs --token (or VTPU_TOKEN)")
    else:
        proc, url, token, tmp = _start_agent(args.workers)
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname not in ("127.0.0.1", "::1", "localhost"):
        parser.error("bench-agent loads loopback agents only")
    from vtpu.cpu import cpu_info

    cpu = cpu_info()
    print(f"vtpu bench-agent: {url}  CPU: {cpu.model_name} ({cpu.logical_cpus} logical CPUs)")
    print(
        f"{'case':<16}{'clients':>8}{'ok':>8}{'503':>6}{'errors':>7}{'req/s':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
    )
    try:
        for name, case in CASES.items():
            for clients in levels:
                r = measure(parsed.hostname, parsed.port, token, case, clients, args.requests,
                            args.seconds)  # fmt: skip

                def fmt(v: float | None) -> str:
                    return "-" if v is None else f"{v:.1f}"

                print(
                    f"{name:<16}{clients:>8}{r['ok']:>8}{r['refused']:>6}{r['errors']:>7}"
                    f"{r['rps']:>10.1f}{fmt(r['p50_ms']):>9}{fmt(r['p99_ms']):>9}",
                    flush=True,
                )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
