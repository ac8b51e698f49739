"""The load generator of `manage.py bench_monitoring`: many agents' heartbeats against a running
control plane, from a process of its own (standard library only, so it costs the server little).

`python -m monitoring.loadgen SPEC.json` reads {url, duration, warmup, concurrency, rate,
beats: [{secret, address, body}]} and prints one JSON line: heartbeats answered 200 per second,
latency percentiles (ms) and errors by reason. Each thread keeps one HTTP/1.1 connection alive
(as an agent's urllib does not, but a proxy in front of gunicorn would) and walks its share of
the nodes in turn; `rate` > 0 paces the whole run to that many heartbeats a second (open loop),
0 sends as fast as the server answers. Each node's heartbeat names its own client address in
X-Forwarded-For (the server runs with NUM_PROXIES=1), so the per-address agent throttle applies
per node as it would to nodes on their own machines.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

HEARTBEAT_PATH = "/api/v1/agent/heartbeat"


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run(spec: dict) -> dict:
    target = urlsplit(spec["url"])
    beats = spec["beats"]
    concurrency = max(1, min(int(spec["concurrency"]), len(beats)))
    rate = float(spec.get("rate") or 0)
    start = time.monotonic()
    measure_from = start + float(spec.get("warmup", 0))
    stop_at = measure_from + float(spec["duration"])
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[Counter] = [Counter() for _ in range(concurrency)]
    answered = [0] * concurrency  # 200s including the warm-up (server CPU per heartbeat)

    def worker(index: int) -> None:
        mine = beats[index::concurrency]
        interval = concurrency / rate if rate else 0.0
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        sent = 0
        while True:
            due = None
            if interval:
                due = start + index * interval / concurrency + sent * interval
                if due > stop_at:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
            began = time.monotonic()
            if began >= stop_at:
                break
            beat = mine[sent % len(mine)]
            sent += 1
            headers = {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {beat['secret']}",
                "X-Forwarded-For": beat["address"],
            }
            try:
                connection.request("POST", HEARTBEAT_PATH, body=beat["body"], headers=headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                status = type(exc).__name__
            answered[index] += status == 200
            if began < measure_from:
                continue
            if status == 200:
                # Paced: from when it was due, so a server that falls behind shows it.
                latencies[index].append((time.monotonic() - (due or began)) * 1000)
            else:
                errors[index][str(status)] += 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - measure_from
    measured = sorted(ms for part in latencies for ms in part)
    failed = sum(errors, Counter())
    return {
        "seconds": round(seconds, 3),
        "ok": len(measured),
        "ok_with_warmup": sum(answered),
        "errors": dict(failed),
        "per_second": len(measured) / seconds if seconds > 0 else None,
        "p50_ms": percentile(measured, 0.50),
        "p99_ms": percentile(measured, 0.99),
        "max_ms": measured[-1] if measured else None,
        "concurrency": concurrency,
        "rate": rate or None,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m monitoring.loadgen SPEC.json", file=sys.stderr)
        return 2
    with open(argv[1]) as spec:
        print(json.dumps(run(json.load(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
