"""The portal's node pages (portal.views.nodes) through Django's test client: the list and its
live figures, deploying (billing off here: tests/portal/test_nodes_billing.py has Stripe),
bringing your own machine, a node's page and its actions, and 404 for another account's node on
every node route."""

import re
import uuid
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.services import plan_default_ensure
from fleet.models import JobState, Node, NodeAction, NodeTransition
from fleet.services import agents, enrollment
from fleet.services.jobs import store_job_events
from fleet.services.nodes import node_provision_release, node_request
from fleet.services.transitions import node_transition
from monitoring.models import Alert, BenchmarkResult, BenchmarkRun, MaintenanceWindow
from tests.platform.conftest import account, request_node

pytestmark = pytest.mark.django_db

TELEMETRY = {
    "ops_per_cycle": 3.25,
    "throughput_gops": 41.5,
    "mops_per_watt": 812.0,
    "power_watts": 51.1,
    "cache_hit_rate": {"combined": 0.93},
    "ppt_hit_rate": 0.5,
    "sources": {
        "ops_per_cycle": "derived: lifetime ops / runtime cycles",
        "throughput_gops": "derived: lifetime ops / wall time while kernels ran",
        "mops_per_watt": "derived: (ops/s / 1e6) / W over the window",
    },
}


def make_ready(node):
    """What a provisioning job and the agent's first heartbeat do to a node, an hour ago."""
    node_transition(node=node, to_state="provisioning", cause="test: job started")
    node_transition(node=node, to_state="ready", cause="test: first heartbeat")
    NodeTransition.objects.filter(node=node).update(created=timezone.now() - timedelta(hours=1))
    node.jobs.update(state=JobState.SUCCESSFUL)
    node.refresh_from_db()
    return node


def report(node, telemetry=TELEMETRY):
    """A poll of the node's agent: its latest telemetry on the node, one more sample."""
    Node.objects.filter(pk=node.pk).update(last_telemetry=telemetry)
    return agents.store_sample(node, telemetry)


def deploy(client, name: str):
    return client.post(
        reverse("portal-node-deploy"), {"name": name, "plan": str(plan_default_ensure().pk)}
    )


@pytest.fixture
def alpha(alice, local_host):
    return request_node(alice, "alpha")


# ---- the list -----------------------------------------------------------------------------------


def test_a_signed_out_visitor_is_sent_to_sign_in(client):
    for url in ("/", reverse("portal-nodes"), reverse("portal-node-deploy")):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_the_home_page_is_the_node_list_with_state_uptime_and_figures_with_sources(
    alice_web, alpha
):
    make_ready(alpha)
    report(alpha)

    page = alice_web.get("/")

    assert page.status_code == 200
    html = page.content.decode()
    assert "alpha" in html and "ready" in html
    assert "41.5 Gops/s" in html and "3.25 ops/cycle" in html and "812 Mops/W" in html
    # The source on hover, and in text for screen readers.
    assert 'title="Source: derived: (ops/s / 1e6) / W over the window"' in html
    assert '<span class="sr-only"> (source: derived: lifetime ops / runtime cycles)</span>' in html
    assert "Uptime (30 days)" in html and "100.00 %" in html
    assert "script-src 'self';" in page["Content-Security-Policy"]


def test_figures_a_node_did_not_measure_say_so(alice_web, alpha):
    make_ready(alpha)
    report(alpha, {"ops_per_cycle": None, "sources": {"ops_per_cycle": "null: no kernel ran"}})

    html = alice_web.get(reverse("portal-nodes")).content.decode()

    assert html.count("not measured") == 3
    assert "null: no kernel ran" in html


def test_the_list_refreshes_its_rows_from_a_partial(alice_web, alpha, bob, local_host):
    request_node(bob, "bobs-node")
    html = alice_web.get(reverse("portal-nodes")).content.decode()
    assert f'hx-get="{reverse("portal-node-rows")}"' in html

    rows = alice_web.get(reverse("portal-node-rows"), HTTP_HX_REQUEST="true")

    assert rows.status_code == 200
    text = rows.content.decode()
    assert text.startswith('<tbody id="node-rows"') and "alpha" in text
    assert "bobs-node" not in text and "<html" not in text
    # A node on its way polls faster.
    assert 'hx-trigger="every 2s"' in text


def test_terminated_nodes_leave_the_list(alice_web, alpha):
    node_transition(node=alpha, to_state="deprovisioning", cause="test")
    node_transition(node=alpha, to_state="terminated", cause="test")

    assert "alpha" not in alice_web.get(reverse("portal-node-rows")).content.decode()


# ---- deploying (billing off: provisioned at once) -----------------------------------------------


def test_deploying_orders_the_node_and_shows_its_page(
    alice_web, alice, local_host, queued, django_capture_on_commit_callbacks
):
    form = alice_web.get(reverse("portal-node-deploy"))
    assert form.status_code == 200 and b"vTPU node" in form.content
    assert b"Payments are off on this control plane" in form.content
    assert b'aria-current="page">Deploy a node</a>' in form.content

    with django_capture_on_commit_callbacks(execute=True):
        response = deploy(alice_web, "web-1")

    node = Node.objects.get(account=account(alice), name="web-1")
    assert response.status_code == 302
    assert response["Location"] == reverse("portal-node", args=[node.pk])
    assert queued["provision_node"] == [node.jobs.get().pk]
    page = alice_web.get(response["Location"])
    assert b"Node web-1 ordered." in page.content
    assert b"every 1s" in page.content  # the provisioning log polls


def test_a_bad_name_is_explained_next_to_the_name_field(alice_web, local_host):
    response = deploy(alice_web, "Bad Name!")

    assert response.status_code == 400
    html = response.content.decode()
    assert '<span class="error" id="name-error">' in html
    assert "lowercase letters" in html
    assert 'value="Bad Name!"' in html  # what was typed stays
    assert not Node.objects.exists()


def test_a_taken_name_and_an_unknown_plan_are_explained(alice_web, alpha):
    taken = deploy(alice_web, "alpha")
    assert taken.status_code == 409
    assert "already has a node named" in taken.content.decode()

    for plan in ("x", "", "999999"):
        unknown = alice_web.post(reverse("portal-node-deploy"), {"name": "beta", "plan": plan})
        assert unknown.status_code == 400
        assert '<p class="error" id="plan-error">Choose one of the plans above.' in (
            unknown.content.decode()
        )
    assert not Node.objects.filter(name="beta").exists()


def test_a_full_quota_is_explained(alice_web, alice, local_host):
    account(alice).__class__.objects.filter(pk=account(alice).pk).update(node_quota=0)

    response = deploy(alice_web, "beta")

    assert response.status_code == 403
    assert "may have 0 live nodes" in response.content.decode()


# ---- bringing your own machine ------------------------------------------------------------------


def test_bring_your_own_machine_shows_a_one_line_command_with_its_expiry(alice_web, alice):
    assert alice_web.get(reverse("portal-node-enroll")).status_code == 200

    response = alice_web.post(reverse("portal-node-enroll"))

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="enroll-command"' in html and "curl -fsSL http://cp.test/enroll/" in html
    assert "install.sh | sh</pre>" in html
    assert 'data-copy="enroll-command"' in html and "Valid once, until" in html
    assert account(alice).enrollments.count() == 1


def test_the_machine_shows_up_in_the_list_when_it_enrolls(alice_web, alice):
    command = alice_web.post(reverse("portal-node-enroll")).content.decode()
    secret = re.search(r"/enroll/([^/]+)/install\.sh", command)[1]
    assert "your machine" not in alice_web.get(reverse("portal-node-rows")).content.decode()

    enrollment.enrollment_complete(
        secret=secret, hostname="lab-box", agent_url="http://10.0.0.5:8470", port=8470
    )

    rows = alice_web.get(reverse("portal-node-rows")).content.decode()
    assert 'lab-box</a> <span class="muted">(your machine)</span>' in rows


def test_bring_your_own_machine_over_quota_says_so(alice_web, alice):
    account(alice).__class__.objects.filter(pk=account(alice).pk).update(node_quota=0)

    response = alice_web.post(reverse("portal-node-enroll"))

    assert response.status_code == 403
    assert 'id="enroll-error"' in response.content.decode()
    assert not account(alice).enrollments.exists()


# ---- a node's page ------------------------------------------------------------------------------


def test_a_nodes_page_shows_its_state_charts_jobs_flips_and_actions(alice_web, alpha):
    make_ready(alpha)
    report(alpha)

    page = alice_web.get(reverse("portal-node", args=[alpha.pk]))

    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="node-state" class="state state-ready">ready<' in html
    assert alpha.agent_url in html
    assert f'data-url="{reverse("portal-node-charts", args=[alpha.pk])}"' in html
    assert "test: first heartbeat" in html  # the flip up, with its cause
    assert "Benchmark now" in html and "Delete this node" in html
    assert alpha.access_token not in html  # only when asked, by POST


def test_a_nodes_page_shows_benchmarks_with_speedups_alerts_and_maintenance(alice_web, alpha):
    make_ready(alpha)
    now = timezone.now()
    run = BenchmarkRun.objects.create(
        node=alpha, trigger="schedule", state="done", size="quick", finished_at=now
    )
    BenchmarkResult.objects.create(
        run=run, node=alpha, workload="gemm_f32", created=now, ops_per_second=2.5e10,
        ops_per_cycle=8.125, speedup=2.5, baseline="numpy (same run)", correct=True,
    )  # fmt: skip
    Alert.objects.create(
        node=alpha, account=alpha.account, rule="node_down", severity="critical",
        summary="no heartbeat for 90 s", opened_at=now - timedelta(minutes=5),
    )  # fmt: skip
    MaintenanceWindow.objects.create(
        node=alpha, starts_at=now + timedelta(days=1), ends_at=now + timedelta(days=1, hours=1),
        reason="kernel upgrade",
    )  # fmt: skip

    html = alice_web.get(reverse("portal-node", args=[alpha.pk])).content.decode()

    assert "gemm_f32" in html and "25 Gops/s" in html and "8.125" in html
    assert '2.50× <span class="muted">vs numpy (same run)</span>' in html
    assert "no heartbeat for 90 s" in html and "critical" in html
    assert "kernel upgrade" in html


def test_the_job_log_streams_events_after_a_cursor(alice_web, alpha):
    job = alpha.jobs.get()
    store_job_events(
        job_id=job.pk,
        events=[{"counter": n, "event": "runner_on_ok", "task": f"task {n}"} for n in (1, 2, 3)],
    )
    url = reverse("portal-job-log", args=[alpha.pk, job.pk])

    first = alice_web.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "task 1" in first and "task 3" in first
    assert f"{url}?after=3" in first  # the next poll asks for what comes after

    later = alice_web.get(f"{url}?after=2").content.decode()
    assert "task 3" in later and "task 1" not in later

    job.__class__.objects.filter(pk=job.pk).update(state=JobState.SUCCESSFUL)
    done = alice_web.get(f"{url}?after=3").content.decode()
    assert "hx-get" not in done and "Job successful" in done

    assert alice_web.get(f"{url}?after=x").status_code == 400


def test_the_status_polls_while_the_node_moves_and_reloads_the_page_when_a_job_starts(
    alice_web, alice, local_host
):
    held = node_request(account=account(alice), user=alice, name="held", hold=True).node
    url = reverse("portal-node-status", args=[held.pk])
    waiting = alice_web.get(f"{url}?jobs=0", HTTP_HX_REQUEST="true")
    assert f'hx-get="{url}?jobs=0"' in waiting.content.decode()
    assert "HX-Refresh" not in waiting

    node_provision_release(node=held)  # its payment came
    started = alice_web.get(f"{url}?jobs=0", HTTP_HX_REQUEST="true")
    assert started["HX-Refresh"] == "true"

    make_ready(held)
    ready = alice_web.get(f"{url}?jobs=1", HTTP_HX_REQUEST="true").content.decode()
    assert "hx-get" not in ready and ">ready<" in ready


def test_the_token_is_revealed_by_post_only_and_never_cached(alice_web, alpha):
    url = reverse("portal-node-token", args=[alpha.pk])
    assert alice_web.get(url).status_code == 405

    shown = alice_web.post(url, HTTP_HX_REQUEST="true")

    assert shown.status_code == 200
    assert alpha.access_token in shown.content.decode()
    assert shown["Cache-Control"] == "no-store"
    assert b"<html" not in shown.content  # htmx gets the fragment


def test_rotating_the_token_shows_the_new_one_and_tells_the_agent(alice_web, alpha):
    old = alpha.access_token

    rotated = alice_web.post(reverse("portal-node-token-rotate", args=[alpha.pk]))

    alpha.refresh_from_db()
    assert alpha.access_token != old
    assert alpha.access_token in rotated.content.decode()
    assert NodeAction.objects.filter(node=alpha, kind="rotate_token").count() == 1


def test_benchmark_now_asks_the_node_and_a_refusal_is_shown_by_the_button(alice_web, alpha):
    url = reverse("portal-node-benchmark", args=[alpha.pk])

    refused = alice_web.post(url)
    assert refused.status_code == 409
    assert 'id="benchmark-error"' in refused.content.decode()
    assert "only a ready node can be benchmarked" in refused.content.decode()

    make_ready(alpha)
    asked = alice_web.post(url)
    assert asked.status_code == 302 and asked["Location"].endswith("#benchmarks")
    assert BenchmarkRun.objects.get(node=alpha).trigger == "customer"


def test_deleting_needs_the_nodes_name(alice_web, alpha):
    url = reverse("portal-node-delete", args=[alpha.pk])
    assert b"Type the node" in alice_web.get(url).content

    for confirm in ({}, {"confirm": "beta"}):
        refused = alice_web.post(url, confirm)
        assert refused.status_code == 400
        assert "Type the node&#x27;s name, alpha, to confirm." in refused.content.decode()
    alpha.refresh_from_db()
    assert alpha.delete_requested_at is None and alpha.state == "requested"

    deleted = alice_web.post(url, {"confirm": "alpha"})

    assert deleted.status_code == 302
    alpha.refresh_from_db()
    assert alpha.delete_requested_at is not None and alpha.state == "terminated"


def test_a_refused_deletion_is_explained(alice_web, alpha):
    node_transition(node=alpha, to_state="provisioning", cause="test: job started")

    refused = alice_web.post(reverse("portal-node-delete", args=[alpha.pk]), {"confirm": "alpha"})

    assert refused.status_code == 409
    assert "is being provisioned" in refused.content.decode()


def test_chart_data_are_the_nodes_samples_oldest_first_with_gaps_as_null(alice_web, alpha):
    make_ready(alpha)
    report(alpha, {**TELEMETRY, "ops_per_cycle": 1.0})
    report(alpha, {**TELEMETRY, "ops_per_cycle": 2.0, "power_watts": None})

    data = alice_web.get(reverse("portal-node-charts", args=[alpha.pk])).json()

    assert data["ops_per_cycle"] == [1.0, 2.0]
    assert data["power_watts"] == [51.1, None]
    assert data["cache_hit_rate"] == [0.93, 0.93] and data["ppt_hit_rate"] == [0.5, 0.5]
    assert data["t"] == sorted(data["t"]) and len(data["t"]) == 2
    assert data["up"]["v"] == [1, 1] and data["uptime_30_days"] == 1.0


# ---- another account's node ---------------------------------------------------------------------

NODE_ROUTES = [
    ("get", "portal-node"),
    ("get", "portal-node-status"),
    ("get", "portal-node-charts"),
    ("post", "portal-node-token"),
    ("post", "portal-node-token-rotate"),
    ("post", "portal-node-benchmark"),
    ("post", "portal-node-payment"),
    ("get", "portal-node-delete"),
    ("post", "portal-node-delete"),
    ("post", "portal-node-suspend"),
    ("post", "portal-node-resume"),
]


@pytest.mark.parametrize(("method", "name"), NODE_ROUTES)
def test_another_accounts_node_is_not_found_on_every_route(bob_web, alpha, method, name):
    make_ready(alpha)

    for node_id in (alpha.pk, uuid.uuid4()):
        response = getattr(bob_web, method)(
            reverse(name, args=[node_id]), {"confirm": "alpha"} if method == "post" else {}
        )
        assert response.status_code == 404, (name, node_id)
    alpha.refresh_from_db()
    assert alpha.state == "ready" and alpha.delete_requested_at is None
    assert not NodeAction.objects.filter(node=alpha).exists()


def test_another_accounts_job_log_is_not_found(bob_web, alice_web, alpha, bob, local_host):
    job = alpha.jobs.get()
    bobs = request_node(bob, "bobs-node")

    assert bob_web.get(reverse("portal-job-log", args=[alpha.pk, job.pk])).status_code == 404
    # Nor through a node of one's own: a job is found under its own node only.
    assert bob_web.get(reverse("portal-job-log", args=[bobs.pk, job.pk])).status_code == 404
    assert alice_web.get(reverse("portal-job-log", args=[alpha.pk, job.pk])).status_code == 200


# ---- suspend and resume -----------------------------------------------------------------------


def test_the_account_suspends_and_resumes_its_own_node(alice_web, alpha):
    from monitoring.uptime import flip_category, nodes_uptime

    make_ready(alpha)
    page = alice_web.get(reverse("portal-node", kwargs={"node_id": alpha.pk}))
    assert b">Suspend</button>" in page.content
    done = alice_web.post(reverse("portal-node-suspend", kwargs={"node_id": alpha.pk}))
    assert done.status_code == 302
    alpha.refresh_from_db()
    assert alpha.state == "suspended"
    assert NodeAction.objects.filter(node=alpha, kind="suspend", completed_at=None).exists()
    cause = alpha.transitions.last().cause
    assert flip_category(cause) == "suspended_by_account"
    measured = nodes_uptime([alpha], alpha.created, timezone.now())[alpha.pk]
    assert measured.down_seconds == 0  # a pause is not downtime
    page = alice_web.get(reverse("portal-node", kwargs={"node_id": alpha.pk}))
    assert b">Resume</button>" in page.content
    assert (
        alice_web.post(reverse("portal-node-resume", kwargs={"node_id": alpha.pk})).status_code
        == 302
    )
    alpha.refresh_from_db()
    assert alpha.state == "ready"
    assert NodeAction.objects.filter(node=alpha, kind="resume", completed_at=None).exists()
    # Resuming again, or suspending a node that is not ready, says why.
    again = alice_web.post(reverse("portal-node-resume", kwargs={"node_id": alpha.pk}))
    assert again.status_code == 409 and b"Only a suspended node" in again.content


def test_a_node_suspended_for_non_payment_is_not_resumed_by_the_account(alice, alice_web, alpha):
    from billing import dunning
    from billing.models import BillingCustomer

    make_ready(alpha)
    dunning.payment_failed(account_id=alpha.account_id, invoice_id="in_unpaid")
    since = BillingCustomer.objects.get(account_id=alpha.account_id).past_due_since
    dunning.dunning_sweep(now=since + timedelta(days=8))
    alpha.refresh_from_db()
    assert alpha.state == "suspended"
    page = alice_web.get(reverse("portal-node", kwargs={"node_id": alpha.pk}))
    assert b">Resume</button>" not in page.content and b"a payment failed" in page.content
    refused = alice_web.post(reverse("portal-node-resume", kwargs={"node_id": alpha.pk}))
    assert refused.status_code == 403 and b"once the open invoice is paid" in refused.content
    alpha.refresh_from_db()
    assert alpha.state == "suspended"


def test_a_payment_does_not_resume_a_node_the_account_paused(alice, alpha):
    from billing import dunning
    from billing.models import BillingCustomer
    from fleet.services.nodes import node_suspend

    make_ready(alpha)
    node_suspend(node=alpha, by=alice)
    dunning.payment_failed(account_id=alpha.account_id, invoice_id="in_unpaid")
    BillingCustomer.objects.filter(account_id=alpha.account_id).update(standing="suspended")
    assert dunning.payment_recovered_if_settled(account_id=alpha.account_id)
    alpha.refresh_from_db()
    assert alpha.state == "suspended"  # paused by its account: it stays paused


def test_the_api_suspends_and_resumes_too(alice, alpha):
    from tests.platform.conftest import api_client_for

    make_ready(alpha)
    api = api_client_for(alice)
    url = reverse("node-suspend", kwargs={"node_id": alpha.pk})
    assert api.post(url).json()["state"] == "suspended"
    assert api.post(url).status_code == 409
    resumed = api.post(reverse("node-resume", kwargs={"node_id": alpha.pk}))
    assert resumed.status_code == 202 and resumed.json()["state"] == "ready"
