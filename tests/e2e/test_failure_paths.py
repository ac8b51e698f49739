"""Things that go wrong: a cancel, a Celery worker killed in the middle of a provision, Redis
down, and a node's agent killed (alerts, repair, downtime)."""

from __future__ import annotations

import signal
import time

from tests.e2e.conftest import Api, wait_for


def _job(api: Api, node_id: str) -> dict:
    jobs = api.call("GET", f"/api/v1/nodes/{node_id}/jobs")[1]["results"]
    return jobs[0]


def _wait_job(api: Api, node_id: str, states: set[str], timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(api, node_id)
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job stayed {job['state']}, wanted {states}")


def _wait_events(api: Api, job_id: int, at_least: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = api.call("GET", f"/api/v1/jobs/{job_id}/events")[1]["events"]
        if len(events) >= at_least:
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stored no events in {timeout} s")


def test_canceling_a_running_job_stops_ansible_and_fails_the_node(stack, staff, local_host):
    status, node = staff.call("POST", "/api/v1/nodes", {"name": "e2e-cancel", "host": local_host})
    assert status == 201, node
    job = _wait_job(staff, node["id"], {"running"})
    _wait_events(staff, job["id"])
    status, body = staff.call("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert status == 202, body
    job = _wait_job(staff, node["id"], {"canceled", "failed", "successful"}, timeout=60)
    assert job["state"] == "canceled", job
    staff.wait_for_state(node["id"], {"failed"}, timeout=30)
    # Canceling a finished job is refused with a reason.
    status, body = staff.call("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert status == 409 and body


def test_a_worker_killed_mid_provision_leaves_no_job_running_and_no_node_provisioned_twice(
    stack, staff, local_host
):
    status, node = staff.call("POST", "/api/v1/nodes", {"name": "e2e-killed", "host": local_host})
    assert status == 201, node
    job = _wait_job(staff, node["id"], {"running"})
    _wait_events(staff, job["id"], at_least=3)
    stack.kill("worker", signal.SIGKILL)  # the worker and its pool; ansible-playbook survives
    stack.start_worker("worker2")
    # The task comes back (acks_late, visibility timeout) or the orphan sweep finds the job:
    # either way it ends failed with an explanation, never running, and Ansible is not rerun.
    job = _wait_job(staff, node["id"], {"failed", "successful", "canceled"}, timeout=240)
    assert job["state"] == "failed" and "worker" in job["explanation"].lower(), job
    # the node follows its job in the next write (a separate transaction: a loaded machine
    # showed the gap), so wait briefly rather than read once
    staff.wait_for_state(node["id"], {"failed"}, timeout=30)
    # A retry provisions it once, through a new job.
    status, body = staff.call("POST", f"/api/v1/nodes/{node['id']}/retry")
    assert status in (201, 202), body
    staff.wait_for_state(node["id"], {"ready"}, timeout=300)
    _wait_job(staff, node["id"], {"successful", "failed"})
    jobs = staff.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert sorted(j["state"] for j in jobs) == ["failed", "successful"]
    assert staff.call("DELETE", f"/api/v1/nodes/{node['id']}")[0] == 202
    staff.wait_for_state(node["id"], {"terminated"}, timeout=180)


def test_a_node_requested_while_redis_is_down_is_provisioned_once_redis_is_back(
    stack, alice, local_host
):
    """The request commits and answers 201 (not 500) with Redis down; the job waits `pending`;
    once Redis is back, the requeue sweep sends it and the node becomes ready."""
    port = int(stack.env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    stack.kill("redis", signal.SIGTERM)
    try:
        status, node = alice.call("POST", "/api/v1/nodes", {"name": "e2e-redis-down"})
        assert status == 201, node
        assert _job(alice, node["id"])["state"] == "pending"
    finally:
        stack.start_private_redis(port)
    node = alice.wait_for_state(node["id"], {"ready", "failed"}, timeout=300)
    assert node["state"] == "ready", _job(alice, node["id"])
    assert _wait_job(alice, node["id"], {"successful", "failed"})["state"] == "successful"
    jobs = alice.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
    assert len(jobs) == 1  # one job, run once
    assert alice.call("DELETE", f"/api/v1/nodes/{node['id']}")[0] == 202
    alice.wait_for_state(node["id"], {"terminated"}, timeout=180)


def test_a_dead_agent_alerts_is_repaired_and_its_downtime_is_counted(stack, alice, local_host):
    """The agent of a ready node is killed: the node goes down within the grace period; the
    alert reaches a real webhook receiver (signature verified) and the mail outbox (var/mail);
    after REPAIR_AFTER_SECONDS a repair job re-runs the role, which starts the agent again; the
    node is up, the resolved message follows, and the downtime is in the month's uptime, to the
    second."""
    import json
    import os

    from tests.receiver import Receiver, signature_valid

    receiver = Receiver()
    try:
        status, hook = alice.call(
            "POST",
            "/api/v1/alert-channels",
            {"kind": "webhook", "name": "e2e hook", "target": receiver.url},
        )
        assert status == 201, hook
        status, _ = alice.call(
            "POST",
            "/api/v1/alert-channels",
            {"kind": "email", "name": "e2e mail", "target": "alice@example.com"},
        )
        assert status == 201
        status, node = alice.call("POST", "/api/v1/nodes", {"name": "e2e-repair"})
        assert status == 201, node
        state = alice.wait_for_state(node["id"], {"ready", "failed"})["state"]
        assert state == "ready", _job_log(alice, node["id"])
        _wait_job(alice, node["id"], {"successful"})
        pid_file = stack.var_dir / "nodes" / node["id"] / "agent.pid"
        killed_at = time.monotonic()
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        alice.wait_for_state(node["id"], {"degraded"}, timeout=120)
        # Grace: 3 missed heartbeats (2 s each here) plus one sweep period (15 s), with slack.
        assert time.monotonic() - killed_at < 45

        opened = _wait_webhook(receiver, node["id"], "opened")
        headers, body = opened
        assert signature_valid(hook["secret"], headers["X-Vtpu-Signature"], body, now=time.time())
        message = json.loads(body)
        assert message["alert"]["rule"] == "node_down"
        assert message["alert"]["details"]["category"] in ("heartbeat_late", "health_check_failed")
        assert _wait_mail(stack, "FIRING critical", "e2e-repair")

        repaired = alice.wait_for_state(node["id"], {"ready"}, timeout=300)
        jobs = alice.call("GET", f"/api/v1/nodes/{node['id']}/jobs")[1]["results"]
        assert [j["kind"] for j in jobs] == ["repair", "provision"], jobs
        assert jobs[0]["state"] in ("successful", "running"), jobs[0]
        assert repaired["state"] == "ready"
        _, resolved = _wait_webhook(receiver, node["id"], "resolved")
        assert json.loads(resolved)["alert"]["state"] == "resolved"
        assert _wait_mail(stack, "RESOLVED", "e2e-repair")
        status, alerts = alice.call("GET", f"/api/v1/alerts?node={node['id']}")
        assert [(a["rule"], a["state"]) for a in alerts["results"]] == [("node_down", "resolved")]

        # The downtime, to the second: from the flip down to the flip up.
        flips = alice.call("GET", f"/api/v1/nodes/{node['id']}/flips")[1]
        down = [f for f in flips if not f["up"]][-1]
        up = [f for f in flips if f["up"]][-1]
        seconds = _seconds_between(down["at"], up["at"])
        uptime = alice.call("GET", f"/api/v1/nodes/{node['id']}/uptime")[1]
        assert uptime["this_month"]["down_seconds"] == round(seconds), (uptime, flips)
        assert 0 < uptime["this_month"]["uptime_ratio"] < 1
        assert _wait_job(alice, node["id"], {"successful", "failed"})["kind"] == "repair"
        assert alice.call("DELETE", f"/api/v1/nodes/{node['id']}")[0] == 202
        alice.wait_for_state(node["id"], {"terminated"}, timeout=180)
    finally:
        receiver.close()


def _job_log(api: Api, node_id: str) -> str:
    job = _job(api, node_id)
    events = api.call("GET", f"/api/v1/jobs/{job['id']}/events")[1]["events"]
    return "\n".join(str(e.get("stdout") or e.get("event")) for e in events[-15:])


def _seconds_between(start: str, end: str) -> float:
    from datetime import datetime

    parse = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def _wait_webhook(receiver, node_id: str, event: str, timeout: float = 90) -> tuple[dict, bytes]:
    import json

    def received():
        for headers, body in list(receiver.requests):
            message = json.loads(body)
            if message["event"] == event and message["node"]["id"] == node_id:
                return headers, body
        return None

    return wait_for(received, timeout, f"{event!r} webhook for {node_id}", interval=0.5)


def _wait_mail(stack, *words: str, timeout: float = 90) -> str:
    """A mail the run command's file backend wrote under var/mail/ that holds every word."""

    def written():
        for path in sorted((stack.var_dir / "mail").glob("*.log")):
            text = path.read_text(errors="replace")
            if all(w in text for w in words):
                return text
        return None

    return wait_for(written, timeout, f"mail with {words} under {stack.var_dir / 'mail'}", 0.5)
