"""A real Prometheus (Debian's `prometheus`) on dashboards/prometheus/: promtool accepts the
committed configuration and rules; Prometheus scrapes the real control plane and, through its
http_sd (GET /api/v1/prometheus/targets), a real node agent with the fleet's scrape token; every
PromQL expression of the Grafana dashboards and of the rule files returns data from it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.stack import Stack, free_port
from tests.e2e.conftest import agent_get

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "dashboards" / "prometheus"
DASHBOARDS_DIR = REPO / "dashboards" / "grafana" / "dashboards"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
INTERVAL = "1s"  # scrape, rule evaluation and http_sd refresh in the test, instead of 15-30 s
# Grafana's own variables, as Grafana would fill them for a recent time range.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# A figure the node cannot measure is left out (never 0): on a machine without it, the
# expressions reading it must return nothing, and the node's telemetry must say why.
# (metric name fragment -> the telemetry's `sources` key)
MEASURED_ONLY_WITH = {"cache_hit_ratio": "cache_hit_rate"}
BENCHMARK_WORKLOADS = ["gemm_int8_1024", "ppt_structured"]  # ops/cycle and speedup; PPT lookups


def _tools() -> None:
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    assert not missing, f"{missing} not found: install Debian's prometheus (scripts/test does)"


def promtool(*args: str) -> None:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


# ---- the committed files --------------------------------------------------------------------


def test_promtool_accepts_the_committed_configuration_and_rules(tmp_path):
    _tools()
    # The configuration names the run command's secret files relative to itself
    # (../../var/secrets/...); promtool wants them to exist, so check it in a copy of that tree.
    copy = tmp_path / "dashboards" / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, copy)
    secrets = tmp_path / "var" / "secrets"
    secrets.mkdir(parents=True)
    for name in ("metrics_token", "agent_scrape_token"):
        (secrets / name).write_text("x" * 64)
    promtool("check", "config", str(copy / "prometheus.yml"))
    assert RULE_FILES, "no rule files in dashboards/prometheus/rules"
    promtool("check", "rules", *map(str, RULE_FILES))


def _jobs(config: dict) -> dict[str, dict]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def render_config(stack: Stack, out: Path) -> Path:
    """The committed prometheus.yml, pointed at this test's control plane and secret files."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=INTERVAL, evaluation_interval=INTERVAL)
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules" / "*.yml")]
    address = urllib.parse.urlsplit(stack.url).netloc
    jobs = _jobs(config)
    platform, agents = jobs["vtpu-platform"], jobs["vtpu-agents"]
    platform["static_configs"] = [{"targets": [address]}]
    platform["authorization"]["credentials_file"] = stack.env["METRICS_TOKEN_FILE"]
    agents["authorization"]["credentials_file"] = stack.env["AGENT_SCRAPE_TOKEN_FILE"]
    (sd,) = agents["http_sd_configs"]
    assert urllib.parse.urlsplit(sd["url"]).path == "/api/v1/prometheus/targets"
    sd["url"] = stack.url + "/api/v1/prometheus/targets"
    sd["refresh_interval"] = INTERVAL
    sd["authorization"]["credentials_file"] = stack.env["METRICS_TOKEN_FILE"]
    path = out / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- expressions ----------------------------------------------------------------------------


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and query variable of every dashboard."""
    found = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        for variable in doc["templating"]["list"]:
            if variable["type"] != "query":
                continue
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            # label_values(<series selector>, <label>) is Grafana's: the selector is PromQL.
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
            found.append((f"{path.name} variable {variable['name']}", match[1] if match else query))
        for panel in _panels(doc["panels"]):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{path.name} panel {panel['title']!r} {target['refId']}"
                    found.append((where, target["expr"]))
    return found


COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


def split_final_comparison(expr: str) -> tuple[str, str] | None:
    """An expression's two sides around its last top-level comparison, or None. Label matchers
    ({a!="b"}), strings, ranges and parenthesised parts are not top level."""
    depth, quote, last = 0, None, None
    i = 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := COMPARISON.match(expr, i)):
            last = match
            i = match.end()
            continue
        i += 1
    if last is None:
        return None
    right = re.sub(r"^\s*(on|ignoring)\s*\([^)]*\)", "", expr[last.end() :])
    right = re.sub(r"^\s*(group_left|group_right)\s*(\([^)]*\))?", "", right)
    return expr[: last.start()].strip(), right.strip()


def rule_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every recording rule, and both sides of every alert's condition: an
    alert's condition is normally false (no data is the healthy answer), so what is checked is
    that the figures it compares are there."""
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expr = rule["expr"].strip()
                if "record" in rule:
                    found.append((f"{path.name} record {rule['record']}", expr))
                    continue
                sides = split_final_comparison(expr)
                assert sides, f"alert {rule['alert']}: no comparison in {expr!r}"
                left, right = sides
                found.append((f"{path.name} alert {rule['alert']} (left of its comparison)", left))
                found.append((f"{path.name} alert {rule['alert']} (right of it)", right))
    return found


def test_the_dashboards_choose_their_data_source_by_a_variable():
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", path.name
        assert variables["datasource"]["query"] == "prometheus", path.name
        sources = list(_data_sources(doc))
        assert sources, path.name
        for source in sources:  # no hard-coded data source UID anywhere
            assert source == {"type": "prometheus", "uid": "${datasource}"}, (path.name, source)


def _data_sources(node: object) -> Iterator[object]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _data_sources(value)
    elif isinstance(node, list):
        for item in node:
            yield from _data_sources(item)


def test_the_final_comparison_of_an_alert_is_split_outside_matchers_and_parentheses():
    assert split_final_comparison('up{job!="x"} == 0') == ('up{job!="x"}', "0")
    assert split_final_comparison("a < 0.9 * b:c:d") == ("a", "0.9 * b:c:d")
    assert split_final_comparison("count(a == 0) or vector(0)") is None
    assert split_final_comparison("a > bool on(node) group_left(x) b") == ("a", "b")


def substitute(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match[1] or match[2]
        assert name in variables, f"unknown Grafana variable ${name} in {expr!r}"
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


# ---- Prometheus -----------------------------------------------------------------------------


class Prometheus:
    def __init__(self, config: Path, data: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log_file.close()

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                doc = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            doc = json.loads(error.read() or b"{}")
        except OSError as error:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            return {"status": "unreachable", "error": str(error)}
        return doc

    def query(self, expr: str) -> dict:
        doc = self.api("query", query=expr)
        assert doc.get("status") in ("success", "unreachable"), f"{expr!r}: {doc}"
        return doc.get("data") or {"result": []}

    def wait(self, what: str, condition, timeout: float = 40.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.5)
        targets = json.dumps(self.api("targets"), indent=1)[:4000]
        log = self.log.read_text(errors="replace")[-4000:]
        raise AssertionError(
            f"Prometheus: {what} not within {timeout:g} s; targets:\n{targets}\nlog:\n{log}"
        )


@pytest.fixture
def prometheus(stack, tmp_path) -> Iterator[Prometheus]:
    _tools()
    config = render_config(stack, tmp_path)
    promtool("check", "config", str(config))
    running = Prometheus(config, tmp_path / "data", tmp_path / "prometheus.log")
    try:
        yield running
    finally:
        running.stop()  # always: a failed assertion must not leave it running


def has_data(data: dict) -> bool:
    result = data.get("result")
    if data.get("resultType") == "scalar":
        return result is not None
    return bool(result)


# ---- the test -------------------------------------------------------------------------------


def test_prometheus_scrapes_the_platform_and_an_agent_and_every_expression_returns_data(
    stack, alice, local_host, prometheus
):
    # Prometheus runs from the start: it finds the node through http_sd once the node is ready.
    started = time.monotonic()
    status, node = alice.call("POST", "/api/v1/nodes", {"name": "e2e-prometheus"})
    assert status == 201, node
    node = alice.wait_for_state(node["id"], {"ready", "failed"})
    jobs = alice.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert node["state"] == "ready", alice.call("GET", f"/api/v1/jobs/{jobs[0]['id']}")
    node_id = node["id"]
    ready_after = time.monotonic() - started

    # A real benchmark through the node's action channel: it stores the BenchmarkRun and
    # BenchmarkResult rows the vtpu_node_benchmark_* series come from, and runs kernels (ops,
    # PPT lookups) on the agent. The schedule may have asked for one already: then that one.
    status, run = alice.call(
        "POST",
        f"/api/v1/nodes/{node_id}/benchmarks",
        {"size": "tiny", "workloads": BENCHMARK_WORKLOADS},
    )
    assert status in (201, 409), run
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = alice.call("GET", f"/api/v1/nodes/{node_id}/benchmarks")[1]["results"]
        if any(r["state"] == "done" for r in runs):
            break
        assert not any(r["state"] == "failed" for r in runs), runs
        time.sleep(1)
    else:
        raise AssertionError(f"no benchmark of node {node_id} finished: {runs}")
    # One open alert, so vtpu_alerts_open has a row to count (its workload never runs, so no
    # benchmark judgement resolves it while this test looks).
    done = stack.manage(
        "shell",
        "-c",
        "from django.utils import timezone; from fleet.models import Node;"
        " from monitoring.models import Alert;"
        f" n = Node.objects.get(pk='{node_id}');"
        " Alert.objects.create(node=n, account_id=n.account_id, rule='incorrect_result',"
        " workload='prometheus-e2e', severity='critical', summary='seeded by test_prometheus',"
        " opened_at=timezone.now()); print(n.account_id)",
    )
    account_id = done.stdout.strip().splitlines()[-1]

    creds = alice.call("GET", f"/api/v1/nodes/{node_id}/credentials")[1]
    status, telemetry = agent_get(creds["agent_url"], "/vTPU/telemetry", creds["token"])
    assert status == 200
    sources = telemetry["sources"]

    check_prometheus(prometheus, node_id, account_id, sources)
    print(
        f"\nprometheus: node ready in {ready_after:.1f} s, "
        f"all checked in {time.monotonic() - started:.1f} s"
    )
    alice.call("DELETE", f"/api/v1/nodes/{node_id}")


def check_prometheus(prometheus: Prometheus, node_id: str, account_id: str, sources: dict):
    def targets_up() -> dict | None:
        active = prometheus.api("targets").get("data", {}).get("activeTargets", [])
        by_job = {}
        for target in active:
            if target["health"] == "up":
                by_job.setdefault(target["labels"]["job"], []).append(target["labels"])
        agents = [t for t in by_job.get("vtpu-agents", []) if t.get("node") == node_id]
        return (
            (by_job.get("vtpu-platform"), agents)
            if by_job.get("vtpu-platform") and agents
            else None
        )

    _platform, (agent,) = prometheus.wait("the platform and the agent scraped", targets_up)
    assert agent["account"] == account_id and agent["node_name"] == "e2e-prometheus"
    prometheus.wait(
        "the benchmark series",
        lambda: has_data(
            prometheus.query(f'vtpu_node_benchmark_speedup_ratio{{node="{node_id}"}}')
        ),
    )

    variables = {"node": node_id, "account": account_id, **GRAFANA_BUILTINS}
    expressions = [
        (where, substitute(expr, variables))
        for where, expr in dashboard_expressions() + rule_expressions()
    ]
    unmeasured = {
        fragment: sources[key]
        for fragment, key in MEASURED_ONLY_WITH.items()
        if str(sources.get(key, "")).startswith("null")
    }
    expected_empty = {where for where, expr in expressions if any(f in expr for f in unmeasured)}
    # Rates need two scrapes and recording rules an evaluation: ask again until all answer.
    missing: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        missing = [
            f"{where}: {expr}"
            for where, expr in expressions
            if where not in expected_empty and not has_data(prometheus.query(expr))
        ]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, "no data from Prometheus for:\n" + "\n".join(missing)
    for where, expr in expressions:
        if where in expected_empty:  # left out, never a made-up 0
            assert not has_data(prometheus.query(expr)), f"{where}: {expr} has data"
    for fragment, reason in unmeasured.items():
        print(f"\n{fragment}: not measured on this machine, so no data (the node says: {reason})")
    print(f"\n{len(expressions) - len(expected_empty)} expressions returned data")
