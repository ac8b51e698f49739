"""The economics read plain columns (fleet.TelemetrySample.ops_total, uptime_seconds,
energy_joules, energy_source, written by store_sample), not JSON keys per row: the same report,
faster, from a fleet of real runtime telemetry documents.

Samples made before the columns existed are filled by migration fleet 0005; one still without
them (made around store_sample) is read from its JSON, which is also what this test times as
"before". The measured figures for the README: ECONOMICS_SAMPLES=80000 (default 10000)
  pytest tests/dashboards/test_economics_speed.py -s
"""

import copy
import importlib
import os
import time
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from billing.economics import economics_report, jsonable
from fleet.models import Host, Node, TelemetrySample
from fleet.services.agents import sample_counters, store_sample
from tests.platform.conftest import account, make_customer
from vtpu.telemetry import Telemetry

pytestmark = pytest.mark.django_db
SAMPLES = int(os.environ.get("ECONOMICS_SAMPLES", "10000"))
NODES = 20


def telemetry_documents(count: int) -> list[dict]:
    """One real snapshot of the runtime (its full document, ~3 kB of JSON), with its counters
    moved on per sample: ops, uptime and RAPL-measured energy."""
    base = Telemetry().snapshot()
    base["sources"]["power_watts"] = "RAPL package energy (intel-rapl:0)"
    documents = []
    for i in range(count):
        doc = copy.deepcopy(base)
        doc["ops"] = 10**9 * i
        doc["uptime_seconds"] = 60.0 * i
        doc["lifetime"]["energy_joules"] = 3.0 * i
        documents.append(doc)
    return documents


def fleet(now) -> None:
    owner = make_customer(f"speed{uuid.uuid4().hex[:6]}")
    host = Host.objects.create(name="speed-host", kind=Host.Kind.LOCAL, capacity=NODES)
    nodes = [
        Node.objects.create(
            account=account(owner),
            name=f"s{i}",
            host=host,
            state="ready",
            access_token="t",
            access_token_sha256=uuid.uuid4().hex,
        )
        for i in range(NODES)
    ]
    per_node = SAMPLES // NODES
    documents = telemetry_documents(per_node)
    start = now - timedelta(days=29)
    step = timedelta(days=28) / per_node
    for n in nodes:
        TelemetrySample.objects.bulk_create(
            [
                TelemetrySample(node=n, data=doc, created=start + i * step, **sample_counters(doc))
                for i, doc in enumerate(documents)
            ],
            batch_size=2000,
        )
    TelemetrySample.objects.filter(created__gte=now).update(created=now)  # auto_now_add


def timed_report(now) -> tuple[float, dict]:
    best, report = float("inf"), None
    for _ in range(3):
        started = time.perf_counter()
        report = economics_report(now=now)
        best = min(best, time.perf_counter() - started)
    return best, jsonable(report)


@pytest.mark.slow
def test_the_report_reads_the_columns_faster_and_equal_to_the_json():
    now = timezone.now()
    fleet(now)
    assert TelemetrySample.objects.filter(ops_total__isnull=True).count() == 0

    columns_s, from_columns = timed_report(now)
    TelemetrySample.objects.update(  # as if stored before the columns existed
        ops_total=None, uptime_seconds=None, energy_joules=None, energy_source=None
    )
    json_s, from_json = timed_report(now)

    assert from_columns == from_json
    fleet_cost = from_columns["cost_per_trillion_ops"]["fleet"]
    assert fleet_cost["inputs"]["ops_delivered"] == NODES * 10**9 * (SAMPLES // NODES - 1)
    print(
        f"\neconomics_report over {SAMPLES} samples: {columns_s:.3f} s from the columns,"
        f" {json_s:.3f} s from the JSON ({json_s / columns_s:.1f}x)"
    )
    assert columns_s < json_s


def test_store_sample_writes_the_counters_and_drops_what_is_not_a_number():
    fleet_node = Node.objects.create(
        account=account(make_customer(f"cols{uuid.uuid4().hex[:6]}")),
        name="cols",
        access_token="t",
        access_token_sha256=uuid.uuid4().hex,
    )
    good = store_sample(fleet_node, telemetry_documents(3)[2])
    assert (good.ops_total, good.uptime_seconds, good.energy_joules) == (2 * 10**9, 120.0, 6.0)
    assert good.energy_source == "RAPL package energy (intel-rapl:0)"
    big = store_sample(fleet_node, {"ops": 2**60 + 1, "uptime_seconds": 5})
    assert big.ops_total == 2**60 + 1  # exact past 2**53
    bad = store_sample(
        fleet_node,
        {"ops": "many", "uptime_seconds": True, "lifetime": [], "sources": {"power_watts": 5}},
    )
    assert (bad.ops_total, bad.uptime_seconds, bad.energy_joules, bad.energy_source) == (
        None, None, None, None,
    )  # fmt: skip
    assert store_sample(fleet_node, {"ops": 2**64}).ops_total is None  # past bigint


def test_the_migration_fills_the_columns_of_older_samples_as_store_sample_would():
    fill = importlib.import_module("fleet.migrations.0005_sample_counters").FILL_POSTGRESQL
    n = Node.objects.create(
        account=account(make_customer(f"mig{uuid.uuid4().hex[:6]}")),
        name="mig",
        access_token="t",
        access_token_sha256=uuid.uuid4().hex,
    )
    documents = telemetry_documents(2) + [
        {"ops": 3.5e12, "uptime_seconds": 7, "sources": {"power_watts": "model: 35 W"}},
        {"ops": 9, "lifetime": {"energy_joules": None}, "sources": "none"},
        {"ops": "text"},
        {},
    ]
    rows = [TelemetrySample.objects.create(node=n, data=doc) for doc in documents]
    with connection.cursor() as cursor:
        cursor.execute(fill)
    for row, doc in zip(rows, documents, strict=True):
        row.refresh_from_db()
        filled = {name: getattr(row, name) for name in sample_counters(doc)}
        assert filled == sample_counters(doc), doc
