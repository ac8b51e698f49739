"""The fleet's scrape token on a real agent: learnt as its SHA-256 from heartbeat replies, kept
in the state dir, and accepted for GET /metrics only."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.runtime.fake_control_plane import ACCESS_TOKEN, NODE_SECRET, FakeControlPlane, wait_for
from tests.runtime.test_agent import ONES_PROGRAM, call, stop_agent
from tests.runtime.test_heartbeat import start_agent

SCRAPE_TOKEN = "fleet-scrape-token-" + "prom" * 8
SCRAPE_SHA256 = hashlib.sha256(SCRAPE_TOKEN.encode()).hexdigest()


def _stored(state_dir: Path) -> str | None:
    path = state_dir / "scrape_token.sha256"
    return path.read_text().strip() if path.exists() else None


def test_the_scrape_token_opens_get_metrics_and_nothing_else(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with FakeControlPlane() as plane:
        agent = start_agent(state_dir, plane.url)
        try:
            # Before the control plane sent its hash, the scrape token opens nothing.
            wait_for(lambda: plane.beats(), what="a heartbeat")
            assert call(agent, "GET", "/metrics", token=SCRAPE_TOKEN)[0] == 401

            plane.reply_extra = {"scrape_token_sha256": SCRAPE_SHA256}
            wait_for(lambda: _stored(state_dir) == SCRAPE_SHA256, what="the stored hash")
            assert (state_dir / "scrape_token.sha256").stat().st_mode & 0o077 == 0
            status, _headers, body = call(agent, "GET", "/metrics", token=SCRAPE_TOKEN)
            assert status == 200 and b"vtpu_ops_total" in body
            assert call(agent, "GET", "/metrics", token=SCRAPE_TOKEN + "x")[0] == 401
            assert call(agent, "GET", "/metrics")[0] == 200  # the access token still works

            # Every other endpoint refuses it.
            assert call(agent, "GET", "/vTPU/telemetry", token=SCRAPE_TOKEN)[0] == 401
            assert call(agent, "POST", "/vTPU/benchmark", {}, token=SCRAPE_TOKEN)[0] == 401
            assert call(agent, "POST", "/vTPU/programs", ONES_PROGRAM, token=SCRAPE_TOKEN)[0] == 401
            status, _headers, body = call(agent, "GET", "/vTPU/health", token=SCRAPE_TOKEN)
            assert status == 200 and b"node_id" not in body  # liveness only

            # A malformed hash is ignored (the one on record stays); null removes it.
            plane.reply_extra = {"scrape_token_sha256": "not-a-hash"}
            wait_for(lambda: "ignoring scrape_token_sha256" in agent.log(), what="a warning")
            assert call(agent, "GET", "/metrics", token=SCRAPE_TOKEN)[0] == 200
            plane.reply_extra = {"scrape_token_sha256": None}
            wait_for(lambda: _stored(state_dir) is None, what="the hash removed")
            assert call(agent, "GET", "/metrics", token=SCRAPE_TOKEN)[0] == 401

            # Kept across a restart, also when the control plane does not say (an older one).
            plane.reply_extra = {"scrape_token_sha256": SCRAPE_SHA256}
            wait_for(lambda: _stored(state_dir) == SCRAPE_SHA256, what="the stored hash")
        finally:
            stop_agent(agent)
        plane.reply_extra = {}
        agent = start_agent(state_dir, plane.url)
        try:
            assert call(agent, "GET", "/metrics", token=SCRAPE_TOKEN)[0] == 200
        finally:
            stop_agent(agent)
        log = agent.log()
        assert SCRAPE_TOKEN not in log and NODE_SECRET not in log and ACCESS_TOKEN not in log
