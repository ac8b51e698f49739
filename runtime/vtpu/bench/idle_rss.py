"""The memory of a node serving a model, idle: `vtpu bench-embeddings --rss`.

For each precision a real agent process starts with the model preloaded (`vtpu agent
--load-model MODEL --precision P`, its own temporary state dir, a port the kernel picks), answers
one warm-up embeddings request, and is left until its CPU time stops moving (idle). Then its
/proc/<pid>/status gives VmRSS (resident now), VmHWM (the peak so far, the load and the warm-up
included), and RssAnon / RssFile (heap versus mapped files such as the shared libraries). An
agent without a model is measured first, so the model's own share shows. The issue's target:
a node with the model loaded and idle stays under 400 MB RSS (10^6 bytes to the MB here).

Contract: `measure(precision)` returns one row (a dict of bytes) or raises RssUnavailable with
the agent's log; the agent is always stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

TARGET_BYTES = 400 * 10**6
START_SECONDS = 120.0
IDLE_SECONDS = 0.5  # no CPU time used for this long = idle
IDLE_TIMEOUT = 15.0
WARM_UP = ["A short sentence to warm the node up.", "Another one, a little longer than that."]
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


class RssUnavailable(RuntimeError):
    """The agent did not start, load or answer; the message holds the end of its log."""


def read_status(pid: int) -> dict[str, int]:
    """STATUS_FIELDS of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, every thread's


def _wait_idle(pid: int) -> float:
    """Seconds waited until the process used no CPU for IDLE_SECONDS (at most IDLE_TIMEOUT)."""
    began = time.monotonic()
    last, since = _cpu_ticks(pid), time.monotonic()
    while time.monotonic() - began < IDLE_TIMEOUT:
        time.sleep(0.1)
        now = _cpu_ticks(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= IDLE_SECONDS:
            break
    return time.monotonic() - began


def _call(url: str, token: str, method: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def measure(precision: str | None, model: str) -> dict[str, Any]:
    """One agent: with `model` preloaded in `precision` (None: no model), warmed up, idle."""
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="vtpu-rss-") as tmp:
        log_path = Path(tmp) / "agent.log"
        command = [sys.executable, "-m", "vtpu", "agent", "--port", "0",
                   "--state-dir", str(Path(tmp) / "state")]  # fmt: skip
        if precision is not None:
            command += ["--load-model", model, "--precision", precision]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "VTPU_TOKEN": token, "PYTHONUNBUFFERED": "1"},
            )
        try:
            url = _listening_url(proc)
            if url is None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RssUnavailable(f"the agent did not start ({' '.join(command)}):\n{tail}")
            row: dict[str, Any] = {"precision": precision or "no model", "pid": proc.pid}
            if precision is not None:
                loaded = [
                    m
                    for m in _call(f"{url}/vTPU/models", token, "GET")["models"]
                    if m["state"] == "loaded"
                ]
                row["weight_bytes"] = loaded[0]["weight_bytes"]
                answer = _call(f"{url}/v1/embeddings", token, "POST",
                               {"model": model, "input": WARM_UP})  # fmt: skip
                row["warm_up_tokens"] = answer["usage"]["total_tokens"]
            row["idle_wait_s"] = round(_wait_idle(proc.pid), 2)
            row.update(read_status(proc.pid))
            return row
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _listening_url(proc: subprocess.Popen) -> str | None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                return None
            if line.startswith("vTPU agent listening on "):
                return line.split()[4]
        elif proc.poll() is not None:
            return None
    return None


def measure_all(precisions: tuple[str, ...], model: str) -> list[dict[str, Any]]:
    return [measure(p, model) for p in (None, *precisions)]


def format_rows(rows: list[dict[str, Any]], model: str) -> str:
    mb = 1e6
    lines = [
        f"{model}: an idle agent's memory (a real `vtpu agent` process per row, after one "
        f"warm-up request), target < {TARGET_BYTES / mb:.0f} MB RSS",
        f"{'model loaded':<20}{'VmRSS MB':>10}{'VmHWM MB':>10}{'anon MB':>9}{'file MB':>9}"
        f"{'weights MB':>12}{'target':>8}",
    ]
    for r in rows:
        weights = f"{r['weight_bytes'] / mb:>12.1f}" if "weight_bytes" in r else f"{'':>12}"
        label = r["precision"] if r["precision"] == "no model" else f"{r['precision']} weights"
        lines.append(
            f"{label:<20}{r['VmRSS'] / mb:>10.1f}{r['VmHWM'] / mb:>10.1f}"
            f"{r['RssAnon'] / mb:>9.1f}{r['RssFile'] / mb:>9.1f}{weights}"
            f"{'under' if r['VmRSS'] < TARGET_BYTES else 'OVER':>8}"
        )
    lines.append(
        "VmRSS: resident now; VmHWM: the peak (load and warm-up); anon: heap and weights; file: "
        "mapped files (shared libraries), from /proc/<pid>/status"
    )
    return "\n".join(lines)
