"""The node pages in a real browser (Debian's chromium through Playwright, tests/browser.py)
against a live control plane whose Stripe is the session's localstripe: sign in with a saved
card → deploy a node on the default plan → its provisioning log streams in → the node is ready
with its token → its charts draw; bring your own machine with the copied command. axe-core finds
no serious or critical violation on the list, deploy, node and enroll pages; the list has no
horizontal scroll at phone width (375 px).

No worker runs here: the provisioning job is played the way a worker stores it (its events in
batches, the node's transitions, then the agent's telemetry samples)."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from fleet.models import JobState, Node, ProvisioningJob, TelemetrySample
from fleet.services import agents
from fleet.services.jobs import store_job_events
from fleet.services.transitions import node_transition
from tests.billing.conftest import set_default_card
from tests.browser import PHONE, axe_violations, horizontal_overflow, script_errors, sign_in
from tests.conftest import give_card
from tests.platform.conftest import account, make_customer

SAMPLES = 12


@pytest.fixture
def customer(stripe_on, local_host):
    """A customer of their own name (localstripe's state lasts the whole session) with a card."""
    user = make_customer(f"web{uuid.uuid4().hex[:10]}")
    give_card(account(user))
    return user


def play_job(job: ProvisioningJob, first: int, last: int) -> None:
    store_job_events(
        job_id=job.pk,
        events=[
            {"counter": n, "event": "runner_on_ok", "host": "local", "task": f"vtpu step {n}"}
            for n in range(first, last + 1)
        ],
    )


def feed_telemetry(node: Node) -> None:
    """What the poller stores from the agent: samples a few seconds apart, with their sources."""
    now = timezone.now()
    for i in range(SAMPLES):
        telemetry = {
            "ops_per_cycle": 2.0 + i / 10,
            "throughput_gops": 30.0 + i,
            "power_watts": 40.0 + i,
            "mops_per_watt": 700.0 + 10 * i,
            "cache_hit_rate": {"combined": 0.9},
            "ppt_hit_rate": 0.4,
            "sources": {
                "ops_per_cycle": "derived: lifetime ops / runtime cycles",
                "throughput_gops": "derived: lifetime ops / wall time while kernels ran",
                "mops_per_watt": "derived: (ops/s / 1e6) / W over the window",
            },
        }
        sample = agents.store_sample(node, telemetry)
        TelemetrySample.objects.filter(pk=sample.pk).update(
            created=now - timedelta(seconds=5 * (SAMPLES - i))
        )
    Node.objects.filter(pk=node.pk).update(last_telemetry=telemetry)


def assert_accessible(page) -> None:
    assert axe_violations(page) == [], page.url


def test_deploy_a_node_watch_its_log_and_see_its_charts(
    visitor, live_server, customer, console, queued
):
    page = visitor
    sign_in(page, customer, live_server)

    page.goto("/")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Nodes of")
    expect(page.get_by_text("No nodes yet.")).to_be_visible()
    assert_accessible(page)

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Deploy a node").click()
    expect(page.get_by_role("radio", name="vTPU node: USD 200.00")).to_be_checked()
    assert_accessible(page)
    page.get_by_label("Name").fill("web-1")
    page.get_by_role("button", name="Deploy and pay").click()

    # Paid with the saved card: the node's page, its job queued for a worker.
    expect(page.get_by_text("Node web-1 ordered.")).to_be_visible()
    node = Node.objects.get(account=account(customer), name="web-1")
    job = node.jobs.get()
    assert node.charge.state == "paid" and queued["provision_node"] == [job.pk]
    log = page.locator(f"#log-{job.pk}")
    expect(log).to_contain_text("Running")

    # A worker runs the playbook: its events appear without a reload, in order.
    ProvisioningJob.objects.filter(pk=job.pk).update(state=JobState.RUNNING)
    node_transition(node=node, to_state="provisioning", cause=f"job {job.pk} started")
    play_job(job, 1, 3)
    expect(log).to_contain_text("vtpu step 3")
    expect(page.locator("#node-state")).to_have_text("provisioning")
    play_job(job, 4, 6)
    expect(log).to_contain_text("vtpu step 6")
    assert log.locator("li", has_text="vtpu step").all_inner_texts()[0].startswith("vtpu step 1")

    # The agent's first heartbeat, and the job's end.
    node_transition(node=node, to_state="ready", cause="first heartbeat")
    ProvisioningJob.objects.filter(pk=job.pk).update(state=JobState.SUCCESSFUL)
    expect(page.locator("#node-state")).to_have_text("ready")
    expect(log).to_contain_text("Job successful")
    expect(page.locator("#agent-url")).to_have_text(node.agent_url)
    assert log.locator("li", has_text="vtpu step").count() == 6  # no event twice

    page.get_by_role("button", name="Show the token").click()
    expect(page.get_by_label("Access token of web-1")).to_have_value(node.access_token)

    # The agent reports: the node's charts draw its samples.
    feed_telemetry(node)
    page.reload()
    for key in ("ops_per_cycle", "throughput_gops", "cache_hit_rate ppt_hit_rate"):
        chart = page.locator(f'[data-chart="{key}"]')
        expect(chart.locator("canvas")).to_have_count(1)
        assert int(chart.get_attribute("data-points")) == SAMPLES
    expect(page.locator("#charts-status")).to_have_text(f"The last {SAMPLES} telemetry samples.")
    assert int(page.locator('[data-chart="up"]').get_attribute("data-points")) > 0
    assert_accessible(page)

    # Back on the list: the node with its live figures and their sources.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Nodes").click()
    row = page.get_by_role("row", name="web-1")
    expect(row).to_contain_text("ready")
    expect(row.get_by_title("Source: derived: lifetime ops / runtime cycles")).to_have_text(
        "3.1 ops/cycle"
    )
    assert_accessible(page)
    page.set_viewport_size(PHONE)
    assert horizontal_overflow(page) == 0

    assert script_errors(console) == []


def test_a_payment_that_wants_3d_secure_is_confirmed_on_the_page(
    visitor, live_server, customer, console, queued
):
    set_default_card(account(customer), "4000002500003155")
    page = visitor
    sign_in(page, customer, live_server)
    page.goto("/nodes/new/")
    page.get_by_label("Name").fill("secure-1")
    page.get_by_role("button", name="Deploy and pay").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Confirm the payment for secure-1")
    node = Node.objects.get(account=account(customer), name="secure-1")
    assert node.charge.state == "requires_action" and not node.jobs.exists()
    assert_accessible(page)
    page.get_by_role("button", name="Confirm the payment").click()
    page.get_by_role("button", name="Complete authentication").click()  # Stripe.js's dialog

    # Our server read the paid invoice back from Stripe: the node is being provisioned.
    expect(page.get_by_role("heading", level=1)).to_have_text("secure-1")
    node.charge.refresh_from_db()
    assert node.charge.state == "paid"
    assert queued["provision_node"] == [node.jobs.get().pk]
    assert script_errors(console) == []


def test_bring_your_own_machine_copies_the_command(visitor, live_server, customer, console):
    page = visitor
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    sign_in(page, customer, live_server)

    page.goto("/nodes/enroll/")
    page.get_by_role("button", name="Make my command").click()
    command = page.locator("#enroll-command").inner_text()
    assert command.startswith("curl -fsSL http://cp.test/enroll/") and command.endswith("| sh")
    page.get_by_role("button", name="Copy the command").click()

    expect(page.get_by_role("status").filter(has_text="Copied")).to_be_visible()
    assert page.evaluate("() => navigator.clipboard.readText()") == command
    assert_accessible(page)
    page.set_viewport_size(PHONE)
    assert horizontal_overflow(page) == 0
    assert script_errors(console) == []
