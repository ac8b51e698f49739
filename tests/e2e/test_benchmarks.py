"""Continuous benchmarks end to end: a real node's agent receives benchmarks through its
heartbeat channel — the one Celery beat's schedule gives a new node at once, and one its customer
asks for — runs the real suite (BENCHMARK_SIZE=tiny) and its results, with their `sources`, come
back through the API, the 7-day statistics and /metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import _customer, wait_for


def test_benchmarks_reach_a_real_agent_and_their_results_come_back(stack, local_host):
    carol = _customer(stack, "carol")
    status, node = carol.call("POST", "/api/v1/nodes", {"name": "e2e-bench"})
    assert status == 201, node
    node = carol.wait_for_state(node["id"], {"ready", "failed"})
    assert node["state"] == "ready", node
    path = f"/api/v1/nodes/{node['id']}/benchmarks"

    def runs() -> list[dict]:
        status, page = carol.call("GET", path)
        assert status == 200, page
        return page["results"]

    # The customer asks for two workloads; while the schedule's first run of this new node is
    # out, the answer is 409 with the reason, and the request goes through once it is back.
    def asked():
        status, run = carol.call("POST", path, {"workloads": ["gemm_256", "gather"]})
        if status == 409:
            assert "pending" in run["detail"], run
            return None
        assert status == 201, run
        return run

    run = wait_for(asked, 120, "accepted benchmark request")
    assert run["state"] == "pending" and run["size"] == "tiny" and run["trigger"] == "customer"

    def finished():
        mine = next(r for r in runs() if r["id"] == run["id"])
        return mine if mine["state"] != "pending" else None

    done = wait_for(finished, 120, "result of the requested benchmark")
    assert done["state"] == "done", done
    assert [r["workload"] for r in done["results"]] == ["gemm_256", "gather"]
    for result in done["results"]:
        assert result["error"] == "" and result["correct"] in (True, None), result
        assert result["speedup"] and "seconds" in result["sources"], result
    gemm = done["results"][0]
    assert gemm["correct"] is True and gemm["ops_per_second"] and gemm["baseline"]
    assert "ops_per_cycle" in gemm["sources"] and done["machine"]
    # gather moves data: no arithmetic ops/s, and the node says why rather than a number.
    gather = done["results"][1]
    assert gather["ops_per_second"] is None and gather["sources"]["ops_per_second"]

    # Celery beat's schedule benchmarked the new node at once, with the whole suite.
    scheduled = wait_for(
        lambda: [r for r in runs() if r["trigger"] == "schedule" and r["state"] == "done"],
        120,
        "scheduled benchmark",
    )
    assert len(scheduled[0]["results"]) > 2 and scheduled[0]["size"] == "tiny"

    status, stats = carol.call("GET", f"{path}/stats")
    assert status == 200, stats
    by_name = {w["workload"]: w for w in stats["workloads"]}
    assert by_name["gemm_256"]["count"] >= 2 and by_name["gemm_256"]["speedup"]["median"] > 0

    scrape = Path(stack.env["METRICS_TOKEN_FILE"]).read_text().strip()
    request = urllib.request.Request(
        stack.url + "/metrics", headers={"Authorization": f"Bearer {scrape}"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        text = reply.read().decode()
    speedups = {
        sample.labels["workload"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vtpu_node_benchmark_speedup_ratio"
        and sample.labels["node"] == node["id"]
    }
    assert speedups.get("gemm_256"), text

    status, _ = carol.call("DELETE", f"/api/v1/nodes/{node['id']}")
    assert status == 202
    carol.wait_for_state(node["id"], {"terminated"}, timeout=180)
