"""For Prometheus, behind the scrape credential (METRICS_TOKEN): GET /metrics, and the agents to
scrape (GET /api/v1/prometheus/targets, http_sd)."""

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from monitoring.metrics import CONTENT_TYPE, exposition
from monitoring.service_discovery import prometheus_targets


def _scrape_refusal(request: HttpRequest) -> HttpResponse | None:
    """The answer to a request without the scrape token; None when it has it."""
    expected = settings.METRICS_TOKEN
    if not expected:
        return JsonResponse(
            {"detail": "Metrics are off: set METRICS_TOKEN (or METRICS_TOKEN_FILE)."}, status=404
        )
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # Bytes: compare_digest refuses a str with non-ASCII characters (a 500, not a 401).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        response = JsonResponse({"detail": "Send the scrape token as a bearer token."}, status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return None


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    refusal = _scrape_refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(exposition(), content_type=CONTENT_TYPE)


@require_GET
def prometheus_targets_view(request: HttpRequest) -> HttpResponse:
    """Prometheus' http_sd_config: the node agents to scrape, with their labels."""
    refusal = _scrape_refusal(request)
    if refusal is not None:
        return refusal
    return JsonResponse(prometheus_targets(), safe=False)
