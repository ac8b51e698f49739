"""GET /metrics for Prometheus, behind the scrape credential (METRICS_TOKEN)."""

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from monitoring.metrics import CONTENT_TYPE, exposition


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    expected = settings.METRICS_TOKEN
    if not expected:
        return JsonResponse(
            {"detail": "Metrics are off: set METRICS_TOKEN (or METRICS_TOKEN_FILE)."}, status=404
        )
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), expected):
        response = JsonResponse({"detail": "Send the scrape token as a bearer token."}, status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(exposition(), content_type=CONTENT_TYPE)
