"""The run command's demo node serves sentence embeddings, and the control plane loads a model
on it: the stack as `scripts/run` starts it (controlplane.stack with NODE_MODELS naming the
sentence encoder, then bootstrap_demo), its demo node provisioned here by the real role (the
wheel's models extra and the model package installed, the model preloaded), called with the
three lines the README gives a customer."""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest
from openai import OpenAI

from tests.e2e.conftest import Api, agent_get, e2e_stack, wait_for

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, node_wheel):
    """The stack with the run command's settings (NODE_MODELS, private webhooks allowed) and
    its demo: an account with a token, this machine as a host, the demo node requested."""
    env = {"WEBHOOK_ALLOW_PRIVATE": "true", "NODE_MODELS": MODEL}
    with e2e_stack(tmp_path_factory, node_wheel, "demo", env, tail=30) as stack:
        done = stack.manage("bootstrap_demo")
        token = re.search(r"demo API token\s+(\S+)", done.stdout).group(1)
        yield stack, Api(stack.url, token)


def test_the_demo_node_serves_embeddings_and_the_control_plane_loads_a_model_on_it(demo):
    stack, api = demo
    (node,) = api.call("GET", "/api/v1/nodes")[1]["results"]
    node = api.wait_for_state(node["id"], {"ready", "failed"})
    assert node["state"] == "ready", api.call("GET", f"/api/v1/nodes/{node['id']}/jobs")
    status, creds = api.call("GET", f"/api/v1/nodes/{node['id']}/credentials")
    assert status == 200, creds
    agent, token = creds["agent_url"], creds["token"]

    # The role preloaded the model; the README's three lines get its embeddings.
    listed = agent_get(agent, "/vTPU/models", token)[1]["models"]
    assert {m["id"]: m["state"] for m in listed}[MODEL] == "loaded", listed
    client = OpenAI(base_url=f"{agent}/v1", api_key=token)
    texts = ["The vTPU serves embeddings.", "A second, different sentence."]
    answer = client.embeddings.create(model=MODEL, input=texts)
    vectors = np.array([d.embedding for d in answer.data], np.float32)
    assert vectors.shape == (2, 384) and answer.usage.prompt_tokens > 10
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) < 0.99  # two sentences, two directions
    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=f"{agent}/v1", api_key="not-the-token").embeddings.create(
            model=MODEL, input="hi"
        )

    # The control plane loads the model on the node in another precision (freed first on the
    # node): an action carried by the heartbeats, its result back in the API.
    request = urllib.request.Request(
        f"{agent}/vTPU/models/unload",
        data=json.dumps({"model": MODEL}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
    assert MODEL not in {m["id"] for m in agent_get(agent, "/vTPU/models", token)[1]["models"]
                         if m["state"] == "loaded"}  # fmt: skip
    url = f"/api/v1/nodes/{node['id']}/models"
    status, asked = api.call("POST", url, {"model": MODEL, "precision": "int8-dynamic"})
    assert status == 201, asked

    def answered() -> dict | None:
        listed = api.call("GET", f"/api/v1/nodes/{node['id']}/actions")[1]["results"]
        done = next(a for a in listed if a["id"] == asked["id"])
        return done if done["completed_at"] else None

    done = wait_for(answered, 120, "the load_model action's result")
    assert done["ok"] is True, done
    assert done["result"]["state"] == "loaded" and done["result"]["precision"] == "int8-dynamic"
    again = client.embeddings.create(model=MODEL, input=texts)
    int8 = np.array([d.embedding for d in again.data], np.float32)
    assert (np.sum(int8 * vectors, axis=1) > 0.999).all()  # int8-dynamic's cosine bar

    # The work reaches the control plane's telemetry through the heartbeats.
    def counted() -> dict | None:
        latest = api.call("GET", f"/api/v1/nodes/{node['id']}/telemetry")[1]["latest"] or {}
        model = (latest.get("models") or {}).get("loaded", {}).get(MODEL)
        return model if model and model["inputs"] == 2 else None

    seen = wait_for(counted, 60, "the embeddings in the control plane's telemetry")
    assert seen["tokens"] == again.usage.prompt_tokens and seen["requests"] == 1
