"""The portal's node pages (docs/architecture.md, "Portal"): the node list with live figures,
deploying a node (plan, payment, the provisioning log as it streams), bringing your own machine,
and a node's page (charts, benchmarks, alerts, flips, maintenance, jobs, the access token,
benchmark now, delete).

Views read through the selectors and act through the services the API uses; a refusal
(ServiceError) is shown next to what caused it. Another account's node or job is 404. The account
may suspend and resume its own node; a node suspended by billing comes back only with the payment
(fleet.services.nodes.node_resume refuses it)."""

from __future__ import annotations

import uuid
from datetime import datetime

import stripe
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from billing import subscriptions
from billing.models import BillingCustomer, NodeCharge, Plan
from controlplane.errors import ServiceError
from fleet import selectors
from fleet.models import ACTIVE_JOB_STATES, Node, NodeAction, NodeState, ProvisioningJob
from fleet.services import enrollment, nodes
from monitoring import benchmarks, uptime
from monitoring.models import Alert
from portal.views.base import account_of, page

S = NodeState
# States a node leaves by itself: its page and the list keep polling while a node is in one.
MOVING = (S.REQUESTED, S.PROVISIONING, S.DEPROVISIONING)
# The headline figures of the list, as (telemetry key, label); ops/s is throughput_gops.
LIVE_FIGURES = (
    ("throughput_gops", "ops/s"),
    ("ops_per_cycle", "ops/cycle"),
    ("mops_per_watt", "Mops/W"),
)
CHART_SAMPLES = 720  # the newest samples on a node's charts (an hour at the 5 s poll)
LOG_LIMIT = 500  # job events in one answer of the live log


def _own_node(request: HttpRequest, node_id: uuid.UUID) -> Node:
    node = selectors.node_get(account=account_of(request), node_id=node_id)
    if node is None:
        raise Http404("No such node in your account.")
    return node


def _own_job(node: Node, job_id: int) -> ProvisioningJob:
    job = selectors.job_list(node=node).filter(pk=job_id).first() if job_id < 2**63 else None
    if job is None:
        raise Http404("No such job for this node.")
    return job


def _si(value: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def live_figures(node: Node) -> list[dict]:
    """The node's latest ops/s, ops/cycle and Mops/W, each with the agent's word for its source
    (a figure the agent could not measure is shown as such, never as zero)."""
    telemetry = node.last_telemetry or {}
    sources = telemetry.get("sources") or {}
    figures = []
    for key, label in LIVE_FIGURES:
        value = telemetry.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            text = f"{label}: not measured"
        elif key == "throughput_gops":
            text = f"{_si(value * 1e9)}ops/s"
        elif key == "ops_per_cycle":
            text = f"{value:.3g} ops/cycle"
        else:
            text = f"{value:.3g} Mops/W"
        source = str(sources.get(key) or "no source reported")
        figures.append({"key": key, "label": label, "text": text, "source": source})
    return figures


def _percent(ratio: float | None) -> str:
    return "no data yet" if ratio is None else f"{ratio * 100:.2f} %"


def _rows(account) -> list[dict]:
    node_rows = list(selectors.node_list(account=account).exclude(state=S.TERMINATED))
    ratios = uptime.nodes_uptime_30_days(node_rows, now=timezone.now())
    return [
        {
            "node": node,
            "uptime": _percent(ratios[node.pk].ratio if node.pk in ratios else None),
            "figures": live_figures(node),
        }
        for node in node_rows
    ]


def _list_context(request: HttpRequest) -> dict:
    account = account_of(request)
    rows = _rows(account)
    return {
        "account": account,
        "rows": rows,
        "moving": any(r["node"].state in MOVING for r in rows),
    }


@require_safe
@login_required
def node_list(request: HttpRequest) -> HttpResponse:
    return page(request, "portal/nodes/list.html", _list_context(request))


@require_safe
@login_required
def node_rows(request: HttpRequest) -> HttpResponse:
    """The list's table body alone: htmx polls it, so figures refresh without a reload."""
    return page(request, "portal/nodes/_rows.html", _list_context(request))


# ---- deploying a node ---------------------------------------------------------------------------


def _plans() -> list[Plan]:
    return list(
        Plan.objects.filter(active=True, node_kind=Plan.NodeKind.PROVISIONED).order_by(
            "amount_cents", "pk"
        )
    )


def _has_card(account) -> bool:
    return BillingCustomer.objects.filter(account=account).exclude(payment_method_id="").exists()


def _deploy_page(
    request: HttpRequest,
    *,
    errors: dict,
    values: dict,
    status: int = 200,
    declined: Node | None = None,
) -> HttpResponse:
    """The deploy form; after a declined payment, with the held node (a new card pays for it)."""
    account = account_of(request)
    plans = _plans()
    billing_on = subscriptions.billing_enabled()
    paid = billing_on and any(p.amount_cents > 0 for p in plans)
    return page(
        request,
        "portal/nodes/deploy.html",
        {
            "plans": [
                {
                    "plan": plan,
                    "price": (
                        f"{plan.currency.upper()} {plan.amount_cents / 100:.2f} per node per"
                        f" {plan.interval}"
                        if plan.amount_cents
                        else "free"
                    ),
                    "sla": f"{plan.sla_target * 100:g} %",
                }
                for plan in plans
            ],
            "needs_card": paid and not _has_card(account),
            "card_url": f"{reverse('billing-card')}?next={reverse('portal-node-deploy')}",
            "declined": declined,
            "billing_on": billing_on,
            "errors": errors,
            "values": values,
        },
        status=status,
    )


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
def node_deploy(request: HttpRequest) -> HttpResponse:
    """Choose a plan and a name; the order is paid with the card on file (or confirmed with 3-D
    Secure), then the node's page streams its provisioning log."""
    if request.method == "GET":
        plans = _plans()
        values = {"name": "", "plan": str(plans[0].pk) if plans else ""}
        return _deploy_page(request, errors={}, values=values)
    account = account_of(request)
    values = {"name": request.POST.get("name", "").strip(), "plan": request.POST.get("plan", "")}
    plan_ids = {str(plan.pk): plan.pk for plan in _plans()}
    if values["plan"] not in plan_ids:
        errors = {"plan": "Choose one of the plans above."}
        return _deploy_page(request, errors=errors, values=values, status=400)
    try:
        order = subscriptions.node_order(
            account=account,
            user=request.user,
            name=values["name"],
            plan_id=plan_ids[values["plan"]],
        )
    except ServiceError as exc:
        return _deploy_page(
            request, errors={exc.field or "form": exc.message}, values=values, status=exc.status
        )
    except stripe.StripeError as exc:
        message = f"Stripe did not answer ({exc.user_message or exc}). Try again in a minute."
        return _deploy_page(request, errors={"form": message}, values=values, status=502)
    charge = order.charge
    if charge is not None and charge.state == NodeCharge.State.DECLINED:
        message = f"{charge.message or 'Your card was declined.'} Nothing was provisioned."
        return _deploy_page(
            request, errors={"form": message}, values=values, status=402, declined=order.node
        )
    if charge is not None and charge.state == NodeCharge.State.REQUIRES_ACTION:
        return page(
            request,
            "portal/nodes/authenticate.html",
            {
                "node": order.node,
                "client_secret": order.client_secret,
                "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
                "stripe_js_url": settings.STRIPE_JS_URL,
            },
            stripe=True,
        )
    messages.success(request, f"Node {order.node.name} ordered.")
    return redirect("portal-node", node_id=order.node.pk)


@require_POST
@login_required
def node_payment_check(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """After 3-D Secure in the browser: re-read the node's invoice from Stripe (never the
    browser's word), so the node starts at once rather than at the webhook."""
    node = _own_node(request, node_id)
    charge = NodeCharge.objects.filter(node=node).first()
    if charge is not None and charge.stripe_invoice_id:
        try:
            subscriptions.invoice_sync(invoice_id=charge.stripe_invoice_id)
        except stripe.StripeError:
            pass  # the webhook or reconciliation will tell; the node page says it waits
    return redirect("portal-node", node_id=node.pk)


# ---- bringing your own machine ------------------------------------------------------------------


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
def node_enroll(request: HttpRequest) -> HttpResponse:
    """A one-time link for the customer's own machine, as the one-line command to run there."""
    account = account_of(request)
    context: dict = {"errors": {}, "ttl_minutes": settings.ENROLLMENT_TTL_SECONDS // 60}
    if request.method == "POST":
        try:
            subscriptions.order_check(
                account=account,
                plan=subscriptions.plan_for_order(plan_id=None, node_kind=Plan.NodeKind.ENROLLED),
            )
            created = enrollment.enrollment_create(account=account, user=request.user)
        except ServiceError as exc:
            context["errors"] = {"form": exc.message}
            return page(request, "portal/nodes/enroll.html", context, status=exc.status)
        url = f"{settings.PUBLIC_URL}/enroll/{created.secret}/install.sh"
        context["command"] = f"curl -fsSL {url} | sh"
        context["expires_at"] = created.enrollment.expires_at
    return page(request, "portal/nodes/enroll.html", context)


# ---- a node's page ------------------------------------------------------------------------------


def _status_context(node: Node) -> dict:
    charge = NodeCharge.objects.filter(node=node).first()
    return {
        "node": node,
        "charge": charge,
        "moving": node.state in MOVING,
        "figures": live_figures(node),
        "self_reported": node.kind == Node.Kind.ENROLLED,
        "job_count": node.jobs.count(),
    }


def _job_context(job: ProvisioningJob, after: int = -1) -> dict:
    events = selectors.job_events(job=job, after=after, limit=LOG_LIMIT)
    last = events[-1].counter if events else after
    # Poll on while the job runs, or while a full page says more events are waiting.
    live = job.state in ACTIVE_JOB_STATES or len(events) == LOG_LIMIT
    return {"job": job, "events": events, "after": last, "live": live}


@require_safe
@login_required
def node_detail(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    return _detail_page(request, _own_node(request, node_id))


def _runs(node: Node) -> list:
    """The newest benchmark runs, each result's ops/s written out for people."""
    runs = list(benchmarks.benchmark_run_list(node=node)[:20])
    for run in runs:
        for result in run.results.all():
            value = result.ops_per_second
            result.ops_text = "—" if value is None else f"{_si(value)}ops/s"
    return runs


def _detail_page(request, node: Node, *, errors: dict | None = None, status: int = 200):
    now = timezone.now()
    jobs = list(selectors.job_list(node=node)[:10])
    context = {
        **_status_context(node),
        "errors": errors or {},
        "uptime_30_days": _percent(uptime.node_uptime_30_days(node, now=now).ratio),
        "runs": _runs(node),
        "alerts": list(
            Alert.objects.filter(account=node.account, node=node).order_by("-opened_at")[:50]
        ),
        "flips": list(reversed(uptime.node_flips(node)))[:50],
        "windows": list(uptime.windows_for(node)),
        "jobs": [_job_context(job) for job in jobs],
        "rotation_pending": NodeAction.objects.filter(
            node=node, kind=NodeAction.Kind.ROTATE_TOKEN, completed_at__isnull=True
        ).exists(),
        "can_suspend": node.state in (NodeState.READY, NodeState.DEGRADED),
        "can_resume": nodes.suspended_by_account(node),
    }
    return page(request, "portal/nodes/detail.html", context, status=status)


@require_safe
@login_required
def node_status(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """The node's state, payment and figures alone (htmx polls it while the node moves). When
    the page was drawn before the node had a job (it waited for its payment) and one has
    started, htmx reloads the page, so its log shows."""
    node = _own_node(request, node_id)
    context = _status_context(node)
    response = page(request, "portal/nodes/_status.html", context)
    if request.GET.get("jobs") == "0" and context["job_count"]:
        response["HX-Refresh"] = "true"
    return response


@require_safe
@login_required
def job_log(request: HttpRequest, node_id: uuid.UUID, job_id: int) -> HttpResponse:
    """A job's events after `after`, and (while it runs) the poller that asks for the next."""
    job = _own_job(_own_node(request, node_id), job_id)
    try:
        after = max(-1, min(int(request.GET.get("after", "-1")), 2**31 - 1))
    except ValueError:
        return HttpResponse("after must be an event counter (a whole number).", status=400)
    return page(request, "portal/nodes/_log.html", _job_context(job, after))


def _token_page(request: HttpRequest, node: Node, *, error: str = "", status: int = 200):
    template = "portal/nodes/_token.html" if request.htmx else "portal/nodes/token.html"
    response = page(request, template, {"node": node, "error": error}, status=status)
    response["Cache-Control"] = "no-store"  # a secret: never kept by a browser or proxy
    return response


@require_POST
@login_required
def node_token(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """Reveal the node's access token (a POST, so no cache or history keeps it)."""
    return _token_page(request, _own_node(request, node_id))


@require_POST
@login_required
def node_token_rotate(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    node = _own_node(request, node_id)
    try:
        node = nodes.node_access_token_rotate(node=node)
    except ServiceError as exc:
        return _token_page(request, node, error=exc.message, status=exc.status)
    return _token_page(request, node)


@require_POST
@login_required
def node_benchmark(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    node = _own_node(request, node_id)
    try:
        benchmarks.benchmark_request(node=node, by=request.user)
    except ServiceError as exc:
        return _detail_page(request, node, errors={"benchmark": exc.message}, status=exc.status)
    messages.success(request, "Benchmark asked for: its result shows here when the node sends it.")
    return redirect(f"{reverse('portal-node', kwargs={'node_id': node.pk})}#benchmarks")


def _pause_or_resume(request: HttpRequest, node_id: uuid.UUID, service, done: str) -> HttpResponse:
    node = _own_node(request, node_id)
    try:
        service(node=node, by=request.user)
    except ServiceError as exc:
        return _detail_page(request, node, errors={"suspend": exc.message}, status=exc.status)
    messages.success(request, done)
    return redirect(reverse("portal-node", kwargs={"node_id": node.pk}))


@require_POST
@login_required
def node_suspend(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    return _pause_or_resume(
        request,
        node_id,
        nodes.node_suspend,
        "Suspended: the node refuses work until you resume it.",
    )


@require_POST
@login_required
def node_resume(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    return _pause_or_resume(
        request,
        node_id,
        nodes.node_resume,
        "Resumed: the node takes work again at its next heartbeat.",
    )


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
def node_delete(request: HttpRequest, node_id: uuid.UUID) -> HttpResponse:
    """Delete a node: a page that says what goes, and a POST that must repeat its name."""
    node = _own_node(request, node_id)
    error, status = "", 200
    if request.method == "POST":
        if request.POST.get("confirm", "").strip() != node.name:
            error = f"Type the node's name, {node.name}, to confirm."
            status = 400
        else:
            try:
                nodes.node_deprovision_request(
                    node=node, cause=f"deleted by {request.user.get_username()} in the portal"
                )
            except ServiceError as exc:
                error, status = exc.message, exc.status
            else:
                messages.success(request, f"Node {node.name} is being deleted.")
                return redirect("portal-node", node_id=node.pk)
    return page(request, "portal/nodes/delete.html", {"node": node, "error": error}, status=status)


# ---- chart data ---------------------------------------------------------------------------------


def _epoch(at: datetime) -> float:
    return round(at.timestamp(), 3)


def _ppt(sample) -> float | None:
    value = (sample.data or {}).get("ppt_hit_rate")
    return None if isinstance(value, bool) or not isinstance(value, int | float) else value


@require_safe
@login_required
def node_chart_data(request: HttpRequest, node_id: uuid.UUID) -> JsonResponse:
    """The node's telemetry samples, oldest first, as columns for the charts (null where a
    figure was not measured), and its up/down history as a step line."""
    node = _own_node(request, node_id)
    samples = list(reversed(selectors.telemetry_recent(node=node, limit=CHART_SAMPLES)))
    now = timezone.now()
    flips = uptime.node_flips(node)
    up_t = [_epoch(f.at) for f in flips]
    up_v = [1 if f.up else 0 for f in flips]
    if flips:
        up_t.append(_epoch(now))
        up_v.append(up_v[-1])
    return JsonResponse(
        {
            "node": str(node.pk),
            "self_reported": node.kind == Node.Kind.ENROLLED,
            "t": [_epoch(s.created) for s in samples],
            "ops_per_cycle": [s.ops_per_cycle for s in samples],
            "throughput_gops": [s.throughput_gops for s in samples],
            "cache_hit_rate": [s.cache_hit_rate for s in samples],
            "ppt_hit_rate": [_ppt(s) for s in samples],
            "power_watts": [s.power_watts for s in samples],
            "mops_per_watt": [s.mops_per_watt for s in samples],
            "up": {"t": up_t, "v": up_v},
            "uptime_30_days": uptime.node_uptime_30_days(node, now=now).ratio,
        }
    )
