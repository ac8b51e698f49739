"""The agent's /metrics exposition: the power figure names its source as a label a dashboard
can show (vtpu_power_source_info)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from vtpu.metrics import _power_source, exposition
from vtpu.telemetry import Telemetry


def test_the_power_source_is_rapl_or_model_also_before_a_figure_exists() -> None:
    assert _power_source("RAPL package energy (package-0)") == "rapl"
    assert _power_source("model: idle + (TDP - idle) x host CPU utilisation") == "model"
    short = "null: window of 0.01 s is too short (need 0.25 s); poll again. Source when measured: "
    assert _power_source(short + "RAPL package energy (package-0)") == "rapl"
    assert _power_source(short + "model: idle + ...") == "model"
    assert _power_source("null: no RAPL, and /proc/stat is unreadable for the model") is None


def test_the_exposition_has_one_power_source_sample_matching_the_telemetry() -> None:
    telemetry = Telemetry(tdp_watts=65, sentrons=1)
    families = {f.name: f for f in text_string_to_metric_families(exposition(telemetry))}
    (sample,) = families["vtpu_power_source_info"].samples
    expected = _power_source(telemetry.snapshot()["sources"]["power_watts"])
    assert sample.labels == {"source": expected} and sample.value == 1
