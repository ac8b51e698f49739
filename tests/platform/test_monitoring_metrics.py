"""The control plane's /metrics: behind the scrape token, computed from the database at scrape
time, base units, unmeasured figures left out."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.models import Node

pytestmark = pytest.mark.django_db

TELEMETRY = {
    "ops_per_cycle": 21.5,
    "throughput_gops": 99.0,
    "cache_hit_rate": {"L1": None, "combined": None},  # no hardware counters
    "ppt_hit_rate": 0.98,
    "power_watts": 41.0,
    "mops_per_watt": 2414.6,
}


def scrape(client, token="scrape-me"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return client.get("/metrics", **headers)


def samples(reply) -> dict:
    out = {}
    for family in text_string_to_metric_families(reply.content.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = sample.value
    return out


def test_metrics_need_the_scrape_token(client, settings):
    settings.METRICS_TOKEN = ""
    assert scrape(client).status_code == 404  # off until configured
    settings.METRICS_TOKEN = "scrape-me"
    assert scrape(client, token=None).status_code == 401
    assert scrape(client, token="wrong").status_code == 401
    assert scrape(client).status_code == 200


def test_node_figures_in_base_units_and_unmeasured_ones_left_out(client, settings, alice_node):
    settings.METRICS_TOKEN = "scrape-me"
    Node.objects.filter(pk=alice_node.pk).update(state="ready", last_telemetry=TELEMETRY)
    reply = scrape(client)
    assert reply["Content-Type"].startswith("text/plain")
    values = samples(reply)
    labels = (
        ("account", str(alice_node.account_id)),
        ("name", "alpha"),
        ("node", str(alice_node.pk)),
    )
    assert values[("vtpu_node_up", labels)] == 1.0
    assert values[("vtpu_node_throughput_ops_per_second", labels)] == 99e9
    assert values[("vtpu_node_ppt_hit_ratio", labels)] == 0.98
    assert values[("vtpu_node_power_watts", labels)] == 41.0
    assert ("vtpu_node_cache_hit_ratio", labels) not in values  # not measured: not 0
    assert values[("vtpu_nodes", (("state", "ready"),))] == 1.0
    assert values[("vtpu_provisioning_jobs", (("kind", "provision"), ("state", "pending")))] == 1


def test_a_node_that_is_down_reads_zero(client, settings, alice_node):
    settings.METRICS_TOKEN = "scrape-me"
    Node.objects.filter(pk=alice_node.pk).update(state="degraded")
    values = samples(scrape(client))
    up = [v for (name, labels), v in values.items() if name == "vtpu_node_up"]
    assert up == [0.0]
