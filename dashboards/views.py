"""The staff dashboard (/staff/, issue 9): the economics of billing.economics as pictures, each
beside its inputs and assumptions, a form to change the assumptions, and the fleet's health
with links into the admin. Staff only: anyone else is sent to sign in, or refused (403).

The page and /staff/data.json show one economics_report, as the economics API answers it
(`jsonable`): the charts draw the numbers the page's tables print."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST, require_safe

from api.serializers import ASSUMPTIONS, EconomicAssumptionsSerializer
from billing import economics
from controlplane.csp import with_policy
from dashboards import selectors

# The form's labels (with units); the limits are the API's (EconomicAssumptionsSerializer).
ASSUMPTION_LABELS = {
    "electricity_usd_per_kwh": "Electricity (USD per kWh)",
    "host_hardware_cost_usd": "Upfront cost of one host (USD)",
    "amortisation_months": "Hardware amortised over (months)",
    "modelled_watts_per_node": "Modelled power per node without RAPL (W)",
    "cloud_tpu_usd_per_hour": "Cloud TPU rent (USD per hour)",
    "cloud_tpu_ops_per_second": "Ops per second one cloud TPU hour buys",
    "burn_usd_per_month": "Monthly burn (USD)",
}


def staff_only(view: Callable) -> Callable:
    @wraps(view)
    def check(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not request.user.is_staff:
            raise PermissionDenied("The staff dashboard is for the operator's staff only.")
        return view(request, *args, **kwargs)

    return check


def _days(request: HttpRequest) -> int | str:
    """The telemetry window asked for, or what is wrong with it."""
    text = request.GET.get("days", str(economics.DEFAULT_DAYS))
    wrong = f"The window is a whole number of days from 1 to {economics.MAX_DAYS}, not {text!r}."
    try:
        days = int(text)
    except ValueError:
        return wrong
    return days if 1 <= days <= economics.MAX_DAYS else wrong


def _report(days: int) -> dict:
    return economics.jsonable(economics.economics_report(days=days))


def _assumption_fields(values: dict, errors: dict) -> list[dict]:
    return [
        {
            "name": name,
            "label": ASSUMPTION_LABELS[name],
            "value": values.get(name, ""),
            "errors": [str(e) for e in errors.get(name, [])],
        }
        for name in ASSUMPTIONS
    ]


def _page(
    request: HttpRequest,
    *,
    days: int,
    values: dict | None = None,
    errors: dict | None = None,
    status: int = 200,
) -> HttpResponse:
    report = _report(days)
    if values is None:
        values = {name: report["assumptions"][name] for name in ASSUMPTIONS}
    now = timezone.now()
    context = {
        "report": report,
        "days": days,
        "assumption_fields": _assumption_fields(values, errors or {}),
        "assumption_errors": [str(e) for e in (errors or {}).get("non_field_errors", [])],
        "nodes_by_state": selectors.nodes_by_state(),
        "open_alerts": selectors.open_alerts(),
        "hosts": selectors.hosts_with_capacity(),
        "regressions": selectors.benchmark_regressions(now=now),
        "regression_days": selectors.REGRESSION_DAYS,
        "mismatches": selectors.reconciliation_mismatches(),
    }
    return with_policy(render(request, "dashboards/staff.html", context, status=status))


@require_safe
@staff_only
def dashboard(request: HttpRequest) -> HttpResponse:
    days = _days(request)
    if isinstance(days, str):
        return HttpResponse(days, status=400, content_type="text/plain; charset=utf-8")
    return _page(request, days=days)


@require_safe
@staff_only
def data(request: HttpRequest) -> JsonResponse:
    """The page's economics as JSON: what GET /api/v1/economics answers for the same fleet."""
    days = _days(request)
    if isinstance(days, str):
        return JsonResponse({"detail": days}, status=400)
    return JsonResponse({"economics": _report(days)})


@require_POST
@staff_only
def assumptions(request: HttpRequest) -> HttpResponse:
    """Record new assumptions (billing.economics.assumptions_record); bad values are shown
    beside their fields, with what was typed."""
    values = {name: request.POST.get(name, "").strip() for name in ASSUMPTIONS}
    given = {name: value for name, value in values.items() if name in request.POST}
    form = EconomicAssumptionsSerializer(data=given, partial=True)
    if not form.is_valid():
        return _page(
            request, days=economics.DEFAULT_DAYS, values=values, errors=form.errors, status=400
        )
    economics.assumptions_record(by=request.user, values=form.validated_data)
    messages.success(request, "Assumptions saved: every figure below uses them.")
    return redirect("staff-dashboard")
