"""POST /billing/stripe/webhook: Stripe's deliveries. No session or token: the Stripe signature
is the credential (billing.services.webhook_receive verifies it)."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from billing import services

# Stripe's events are a few kilobytes; anything far larger is refused unread.
MAX_BODY_BYTES = 256 * 1024


@csrf_exempt
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        response = JsonResponse({"detail": "Stripe delivers events with POST."}, status=405)
        response["Allow"] = "POST"
        return response
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return JsonResponse({"detail": "Content-Length is not a number."}, status=400)
    if length > MAX_BODY_BYTES:
        return JsonResponse(
            {"detail": f"The body is {length} bytes; at most {MAX_BODY_BYTES} are accepted."},
            status=413,
        )
    if length <= 0:
        return JsonResponse({"detail": "The body is empty; Stripe sends an event."}, status=400)
    reply = services.webhook_receive(
        body=request.body, signature=request.headers.get("Stripe-Signature", "")
    )
    body = {"detail": reply.detail}
    if reply.event is not None and reply.event.stripe_id:
        body["event"] = reply.event.stripe_id
    return JsonResponse(body, status=reply.status)
