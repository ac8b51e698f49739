"""node_provision with the real provisioning.runner, on the failure path that needs no node:
an SSH host nobody listens on. (The lead's end-to-end tests provision for real.)"""

import pytest

from fleet.models import Host, JobEvent
from fleet.services.jobs import job_run as node_provision
from tests.platform.conftest import request_node

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


def test_an_unreachable_host_fails_the_job_and_the_node_with_a_reason(staff, settings):
    settings.PROVISIONING_JOB_TIMEOUT = 60
    host = Host.objects.create(
        name="nowhere",
        kind="ssh",
        address="127.0.0.1",
        ssh_port=1,
        ssh_user="nobody",
        base_dir="/tmp/vtpu-nodes",
        ssh_private_key="not a key",
        ssh_known_hosts="[127.0.0.1]:1 ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
    )
    node = request_node(staff, "lost", host=host)
    job = node_provision(job_id=node.jobs.get().pk)
    node.refresh_from_db()
    assert job.state == "failed", job.explanation
    # runner_pid is recorded when the cancel poll first sees ansible-playbook; a refused SSH
    # connection can end the run before that, so it is not asserted here.
    assert job.explanation and job.finished_at
    assert node.state == "failed" and job.explanation in node.transitions.last().cause
    assert JobEvent.objects.filter(job=job).exists()
    assert node.access_token not in job.stdout
