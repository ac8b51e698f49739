"""Prometheus exposition through prometheus_client: one Collector yielding the node's `vtpu_*`
metrics in base units (seconds, bytes, watts, ratios), for the agent's /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from vtpu import __version__
from vtpu.counters import PIPES

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def _counter(name: str, help_: str, value: Any, labels: dict | None = None) -> Metric | None:
    if value is None:
        return None
    family = CounterMetricFamily(name, help_, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _gauge(name: str, help_: str, samples: list[tuple[dict, Any]]) -> Metric | None:
    samples = [(labels, value) for labels, value in samples if value is not None]
    if not samples:
        return None  # a figure that was not measured is not shown
    family = GaugeMetricFamily(name, help_, labels=list(samples[0][0]))
    for labels, value in samples:
        family.add_metric(list(labels.values()), value)
    return family


def _power_source(source: str) -> str | None:
    """rapl or model, from the telemetry's sentence about power (also while its window is too
    short to give a figure); None when power cannot be known at all."""
    known = source.rpartition("Source when measured: ")[2]
    if known.startswith("RAPL"):
        return "rapl"
    if known.startswith("model"):
        return "model"
    return None


class VtpuCollector:
    """Reads the telemetry (and the agent's own state, when given) at every scrape."""

    def __init__(self, telemetry: Any, agent_state: Callable[[], dict] | None = None) -> None:
        self.telemetry = telemetry
        self.agent_state = agent_state

    def collect(self) -> Iterator[Metric]:
        snap = self.telemetry.snapshot()
        c = self.telemetry.counters.snapshot()
        src = snap["sources"]
        families: list[Metric | None] = [
            _counter("vtpu_ops", src["ops"], c["ops"]),
            _counter("vtpu_kernel_calls", "kernel calls", c["kernel_calls"]),
            _counter(
                "vtpu_runtime_cpu_seconds",
                "CPU time of all threads while kernels ran",
                c.get("runtime_cpu_ns", 0) / 1e9,
            ),
            _counter(
                "vtpu_kernel_seconds",
                "wall time while kernels ran",
                c.get("kernel_wall_ns", 0) / 1e9,
            ),
            _counter("vtpu_runtime_cycles", src["cycles"], snap["cycles"]),
        ]
        for name, help_ in (
            ("siw_issued", "SIW words issued by sentrons"),
            ("programs_run", "SIW programs run"),
            ("errors", "runtime errors"),
            ("ppt_lookups", "PPT translation-cache lookups"),
            ("ppt_hits", "PPT translation-cache hits"),
        ):
            families.append(_counter(f"vtpu_{name}", help_, c[name]))
        busy = CounterMetricFamily(
            "vtpu_pipe_busy_seconds", "busy time of each sentron pipe", labels=["pipe"]
        )
        for p in PIPES:
            busy.add_metric([p], c["pipe_busy_ns"][p] / 1e9)
        families.append(busy)
        families += [
            _counter(
                "vtpu_energy_joules",
                "energy since telemetry started; " + src["power_watts"],
                snap["lifetime"]["energy_joules"],
            ),
            _gauge("vtpu_ops_per_cycle", src["ops_per_cycle"], [({}, snap["ops_per_cycle"])]),
            _gauge(
                "vtpu_throughput_ops_per_second",
                src["throughput_gops"],
                [({}, None if snap["throughput_gops"] is None else snap["throughput_gops"] * 1e9)],
            ),
            _gauge(
                "vtpu_peak_ops_per_second",
                self.telemetry.cpu.peak["source"],
                [({"dtype": d}, snap["peak_gops"][d] * 1e9) for d in ("fp32", "int8")],
            ),
            _gauge("vtpu_utilization_ratio", src["utilization"], [({}, snap["utilization"])]),
            _gauge("vtpu_power_watts", src["power_watts"], [({}, snap["power_watts"])]),
            _gauge(
                "vtpu_power_source_info",
                "where vtpu_power_watts comes from: rapl (measured) or model (TDP x utilisation)",
                [({"source": kind}, 1) for kind in [_power_source(src["power_watts"])] if kind],
            ),
            _gauge("vtpu_uptime_seconds", src["uptime_seconds"], [({}, snap["uptime_seconds"])]),
            _gauge(
                "vtpu_cache_hit_ratio",
                src["cache_hit_rate"],
                [({"level": k}, v) for k, v in snap["cache_hit_rate"].items()],
            ),
            _gauge("vtpu_instructions_per_cycle", src["ipc"], [({}, snap["ipc"])]),
            _gauge("vtpu_ppt_hit_ratio", src["ppt_hit_rate"], [({}, snap["ppt_hit_rate"])]),
            _gauge(
                "vtpu_pipe_occupancy_ratio",
                src["pipe_occupancy"],
                [({"pipe": p}, v) for p, v in snap["pipe_occupancy"].items()],
            ),
            _gauge(
                "vtpu_info",
                "vTPU runtime version, CPU and the instruction set the kernels use",
                [
                    (
                        {
                            "version": __version__,
                            "cpu": self.telemetry.cpu.model_name,
                            "vector_path": snap["isa"]["vector_path"],
                            "isa": ",".join(snap["isa"]["features"]),
                        },
                        1,
                    )
                ],
            ),
        ]
        if self.agent_state is not None:
            families += self._agent_families(self.agent_state())
        yield from (f for f in families if f is not None)

    @staticmethod
    def _agent_families(state: dict) -> list[Metric | None]:
        families: list[Metric | None] = [
            _gauge(
                "vtpu_suspended",
                "1 while the control plane has this node suspended",
                [({}, int(state["suspended"]))],
            ),
            _gauge("vtpu_sentrons", "sentrons in the agent's pool", [({}, state["sentrons"])]),
            _gauge(
                "vtpu_queue_waiting",
                "programs waiting for a free sentron",
                [({}, state["queue_waiting"])],
            ),
            _counter(
                "vtpu_queue_refused",
                "programs refused with 503: the queue was full or the wait too long",
                state["queue_refused"],
            ),
        ]
        families += _model_families(state.get("models"))
        beats = state.get("heartbeats")
        if beats is not None:
            family = CounterMetricFamily(
                "vtpu_heartbeats",
                "heartbeats sent to the control plane, by outcome",
                labels=["outcome"],
            )
            for outcome, count in beats.items():
                family.add_metric([outcome], count)
            families.append(family)
        return families


def _model_families(models: dict | None) -> list[Metric | None]:
    """Resident models: memory, work done, and for LLMs their sequences and KV-cache pages."""
    if not models:
        return []
    loaded = models["loaded"]
    llms = {name: m["llm"] for name, m in loaded.items() if "llm" in m}
    families: list[Metric | None] = [
        _gauge(
            "vtpu_model_budget_bytes", "the node's model memory budget", [({}, models["max_bytes"])]
        ),
        _gauge(
            "vtpu_model_resident_bytes",
            "bytes a loaded model holds: weights, working memory and KV cache",
            [({"model": name}, m["bytes"]) for name, m in loaded.items()],
        ),
    ]
    requests = CounterMetricFamily(
        "vtpu_model_requests", "requests a loaded model served", labels=["model"]
    )
    tokens = CounterMetricFamily(
        "vtpu_model_tokens", "tokens a loaded model processed, by kind", labels=["model", "kind"]
    )
    embeddings = CounterMetricFamily(
        "vtpu_model_embeddings", "embeddings a loaded sentence encoder returned", labels=["model"]
    )
    for name, m in loaded.items():
        llm = llms.get(name)
        requests.add_metric([name], llm["requests"] if llm else m["requests"])
        if llm:
            tokens.add_metric([name, "prompt"], llm["prompt_tokens"])
            tokens.add_metric([name, "generated"], llm["generated_tokens"])
        else:
            tokens.add_metric([name, "input"], m["tokens"])
            embeddings.add_metric([name], m["inputs"])
    families += [requests, tokens, embeddings]
    if llms:
        families += [
            _gauge(
                "vtpu_llm_sequences",
                "sequences of a loaded LLM, by state",
                [
                    ({"model": n, "state": s}, llm[f"{s}_sequences"])
                    for n, llm in llms.items()
                    for s in ("active", "waiting")
                ],
            ),
            _gauge(
                "vtpu_kv_cache_pages",
                "KV-cache pages of a loaded LLM, by state",
                [
                    ({"model": n, "state": s}, llm[f"pages_{s}"])
                    for n, llm in llms.items()
                    for s in ("total", "used", "reserved")
                ],
            ),
        ]
    return families


def exposition(telemetry: Any, agent_state: Callable[[], dict] | None = None) -> str:
    """The Prometheus text exposition (version 0.0.4) of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VtpuCollector(telemetry, agent_state))
    return generate_latest(registry).decode("utf-8")
