"""API handlers: parse input, call one service or selector, render.

Every customer-facing handler acts for one account (the API token's, or the session user's):
another account's node, job, token or enrollment is answered 404 exactly like one that does not
exist. A service's refusal (FleetError, AccountError) becomes its HTTP status with the sentence
for people; a bad field becomes 400 with the reason under that field's name. Every status an
operation can answer is in its OpenAPI description (`errors(...)`).
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import date, timedelta

import stripe
from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.defaults import page_not_found
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)
from rest_framework import generics, status
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.permissions import AllowAny, IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import Account, ApiToken
from api import serializers as s
from api.pagination import int_query_param
from billing import economics, subscriptions
from billing import services as billing_services
from billing.models import BillingCustomer, Invoice, NodeCharge, Plan, ReconciliationIssue
from controlplane.errors import ServiceError
from fleet import selectors
from fleet.models import Host, Node, NodeAction, ProvisioningJob
from fleet.services import enrollment, heartbeats, jobs, nodes
from fleet.services.errors import FleetError, Forbidden
from monitoring import benchmarks, uptime
from monitoring import services as monitoring_services
from monitoring.models import Alert, AlertChannel, SlaCredit, SlaMonthClosed

log = logging.getLogger(__name__)
ERROR_TEXT = {
    400: "Bad input: the reason is under the field's name (and in `detail`).",
    401: "No valid credentials.",
    403: "Not allowed (e.g. over the account's node quota, or a staff-only choice).",
    404: "No such thing in your account.",
    409: "Not possible in the current state; the sentence says why.",
    402: "Payment needed: no card, a declined card, or money owed; the sentence says what to do.",
    410: "Gone: used, expired, or deprovisioned.",
    413: "The request is too large.",
    429: "Too many requests; retry after `Retry-After` seconds.",
    502: "Stripe did not answer; nothing was charged. Retry in a minute.",
    503: "No capacity right now (or billing is off here); retry later.",
}


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """The error answers of an operation, for its OpenAPI description. 401 and 429 come with
    every authenticated, throttled operation."""
    out = {}
    for code in sorted({*codes, 401, 429}):
        shape = s.FieldErrorsSerializer if code == 400 else s.ErrorSerializer
        out[code] = OpenApiResponse(shape, description=ERROR_TEXT[code])
    return out


def service_error_response(exc: ServiceError) -> Response:
    body: dict = {"detail": exc.message}
    if exc.field:
        body[exc.field] = [exc.message]
    return Response(body, status=exc.status)


class AccountView:
    """Acts for one account; turns services' refusals into HTTP answers."""

    # JSON only: form encodings cannot say null, so a schema offering them would promise
    # bodies the API cannot read.
    parser_classes = [JSONParser]

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, ServiceError):
            return service_error_response(exc)
        if isinstance(exc, stripe.StripeError):  # a Stripe failure nothing above turned into words
            log.warning("Stripe failed: %s", exc)
            return Response(
                {"detail": f"Stripe did not answer: {exc.user_message or exc}. Retry in a minute."},
                status=status.HTTP_502_BAD_GATEWAY,
            )
        return super().handle_exception(exc)  # type: ignore[misc]

    @property
    def account(self) -> Account:
        request = self.request  # type: ignore[attr-defined]
        cached = getattr(request, "_vtpu_account", None)
        if cached is not None:
            return cached
        token = request.auth
        if isinstance(token, ApiToken):
            account = token.account
        else:
            account = account_selectors.account_of_user(user=request.user)
        if account is None or not account.is_active:
            raise PermissionDenied("Your user belongs to no active account.")
        request._vtpu_account = account
        return account

    def own_node(self, node_id: uuid.UUID) -> Node:
        node = selectors.node_get(account=self.account, node_id=node_id)
        if node is None:
            raise NotFound("No such node in your account.")
        return node

    def own_job(self, job_id: int) -> ProvisioningJob:
        job = None
        if 1 <= job_id <= MAX_ID:
            job = selectors.job_get(account=self.account, job_id=job_id)
        if job is None:
            raise NotFound("No such job in your account.")
        return job


def _int_parameter(name: str, low: int, high: int, description: str) -> OpenApiParameter:
    return OpenApiParameter(
        name, {"type": "integer", "minimum": low, "maximum": high}, description=description
    )


# Database ids are positive 64-bit integers; a larger number is no id (and no query overflows).
MAX_ID = 2**63 - 1


def _id_parameter(name: str) -> OpenApiParameter:
    return OpenApiParameter(
        name, {"type": "integer", "minimum": 1, "maximum": MAX_ID}, OpenApiParameter.PATH
    )


# ---- nodes ----------------------------------------------------------------------------------


class NodeListView(AccountView, generics.ListCreateAPIView):
    serializer_class = s.NodeSerializer

    def get_queryset(self):
        return selectors.node_list(account=self.account).select_related("charge")

    @extend_schema(responses={200: s.NodeSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=s.NodeCreateSerializer,
        responses={
            201: s.NodeOrderedSerializer,
            402: OpenApiResponse(
                s.NodeDeclinedSerializer,
                description="No card, money owed, or the card was declined: nothing is"
                " provisioned; `detail` says what to do.",
            ),
            **errors(400, 403, 404, 409, 502, 503),
        },
    )
    def post(self, request: Request, *args, **kwargs) -> Response:
        data = s.NodeCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        order = subscriptions.node_order(
            account=self.account,
            user=request.user,
            name=data.validated_data["name"],
            host=self._host(data.validated_data.get("host")),
            plan_id=data.validated_data.get("plan"),
        )
        body = s.NodeOrderedSerializer(
            order.node, context={"client_secret": order.client_secret}
        ).data
        if order.charge is not None and order.charge.state == NodeCharge.State.DECLINED:
            return Response(
                {"detail": order.charge.message, "node": body},
                status=status.HTTP_402_PAYMENT_REQUIRED,
            )
        return Response(body, status=status.HTTP_201_CREATED)

    def _host(self, host_id: int | None) -> Host | None:
        if host_id is None:
            return None
        if not self.request.user.is_staff:  # before the lookup: ids of hosts are staff's
            raise Forbidden("Only staff can choose the host of a node.", field="host")
        host = Host.objects.filter(pk=host_id).first()
        if host is None:
            raise NotFound("No such host.")
        return host


class NodeDetailView(AccountView, APIView):
    @extend_schema(responses={200: s.NodeSerializer, **errors(403, 404)})
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        return Response(s.NodeSerializer(self.own_node(node_id)).data)

    @extend_schema(request=None, responses={202: s.NodeSerializer, **errors(403, 404, 409)})
    def delete(self, request: Request, node_id: uuid.UUID) -> Response:
        node = self.own_node(node_id)
        nodes.node_deprovision_request(
            node=node, cause=f"deleted by {request.user.get_username()} through the API"
        )
        node.refresh_from_db()
        return Response(s.NodeSerializer(node).data, status=status.HTTP_202_ACCEPTED)


class NodeRetryView(AccountView, APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer, **errors(403, 404, 409)})
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        job = nodes.node_retry(node=self.own_node(node_id))
        return Response(s.JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class NodeSuspendView(AccountView, APIView):
    """Pause the node: its agent refuses work, keeps its data and heartbeats; not downtime."""

    @extend_schema(request=None, responses={202: s.NodeSerializer, **errors(403, 404, 409)})
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        node = nodes.node_suspend(node=self.own_node(node_id), by=request.user)
        return Response(s.NodeSerializer(node).data, status=status.HTTP_202_ACCEPTED)


class NodeResumeView(AccountView, APIView):
    """Resume a node the account suspended (one suspended for non-payment: 403)."""

    @extend_schema(request=None, responses={202: s.NodeSerializer, **errors(403, 404, 409)})
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        node = nodes.node_resume(node=self.own_node(node_id), by=request.user)
        return Response(s.NodeSerializer(node).data, status=status.HTTP_202_ACCEPTED)


def _credentials(node: Node) -> dict:
    pending = NodeAction.objects.filter(
        node=node, kind=NodeAction.Kind.ROTATE_TOKEN, completed_at__isnull=True
    ).exists()
    return {"agent_url": node.agent_url, "token": node.access_token, "rotation_pending": pending}


class NodeCredentialsView(AccountView, APIView):
    """The node's agent URL and your access token for it (benchmarks, embeddings)."""

    @extend_schema(responses={200: s.NodeCredentialsSerializer, **errors(403, 404)})
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        return Response(_credentials(self.own_node(node_id)))


class NodeCredentialsRotateView(AccountView, APIView):
    """A new access token; the agent gets its hash through the heartbeat channel."""

    @extend_schema(
        request=None, responses={200: s.NodeCredentialsSerializer, **errors(403, 404, 409)}
    )
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        node = nodes.node_access_token_rotate(node=self.own_node(node_id))
        return Response(_credentials(node))


class NodeJobsView(AccountView, generics.ListAPIView):
    serializer_class = s.JobSerializer

    def get_queryset(self):
        return selectors.job_list(node=self.own_node(self.kwargs["node_id"]))

    @extend_schema(responses={200: s.JobSerializer(many=True), **errors(400, 403, 404)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class NodeTransitionsView(AccountView, generics.ListAPIView):
    """Every state change of the node, oldest first, with its cause."""

    serializer_class = s.TransitionSerializer

    def get_queryset(self):
        return selectors.transition_list(node=self.own_node(self.kwargs["node_id"]))

    @extend_schema(responses={200: s.TransitionSerializer(many=True), **errors(400, 403, 404)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class NodeActionsView(AccountView, generics.ListCreateAPIView):
    """Work for the node's agent (delivered through its heartbeats, at least once)."""

    serializer_class = s.ActionSerializer

    def get_queryset(self):
        return selectors.action_list(node=self.own_node(self.kwargs["node_id"]))

    @extend_schema(responses={200: s.ActionSerializer(many=True), **errors(400, 403, 404)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=s.ActionCreateSerializer,
        responses={201: s.ActionSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, *args, **kwargs) -> Response:
        node = self.own_node(self.kwargs["node_id"])
        data = s.ActionCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        payload = {"quick": data.validated_data["quick"]}
        if data.validated_data.get("workloads") is not None:
            payload["workloads"] = data.validated_data["workloads"]
        action = nodes.node_action_request(
            node=node, kind=data.validated_data["type"], payload=payload
        )
        return Response(s.ActionSerializer(action).data, status=status.HTTP_201_CREATED)


class NodeModelLoadView(AccountView, APIView):
    """Ask the node's agent to make a model resident (a `load_model` action, carried by its next
    heartbeat reply); the action's result says what was loaded, or why not."""

    @extend_schema(
        request=s.ModelLoadSerializer,
        responses={201: s.ActionSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        node = self.own_node(node_id)
        data = s.ModelLoadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        action = nodes.node_action_request(
            node=node,
            kind=NodeAction.Kind.LOAD_MODEL,
            payload=dict(data.validated_data),
        )
        return Response(s.ActionSerializer(action).data, status=status.HTTP_201_CREATED)


class NodeTelemetryView(AccountView, APIView):
    @extend_schema(
        parameters=[_int_parameter("limit", 1, 500, "Samples, newest first (default 60).")],
        responses={200: s.NodeTelemetrySerializer, **errors(400, 403, 404)},
    )
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        node = self.own_node(node_id)
        limit = int_query_param(request, "limit", default=60, low=1, high=500)
        samples = selectors.telemetry_recent(node=node, limit=limit)
        self_reported = node.kind == Node.Kind.ENROLLED
        return Response(
            {
                "latest": node.last_telemetry,
                "self_reported": self_reported,
                "note": s.SELF_REPORTED_NOTE if self_reported else "",
                "samples": s.TelemetrySampleSerializer(samples, many=True).data,
            }
        )


# ---- jobs -----------------------------------------------------------------------------------


class JobDetailView(AccountView, APIView):
    @extend_schema(
        parameters=[_id_parameter("job_id")],
        responses={200: s.JobDetailSerializer, **errors(403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        return Response(s.JobDetailSerializer(self.own_job(job_id)).data)


class JobEventsView(AccountView, APIView):
    @extend_schema(
        parameters=[
            _id_parameter("job_id"),
            _int_parameter("after", -1, 2**31 - 1, "Only events after this counter."),
            _int_parameter("limit", 1, 1000, "At most this many (default 1000)."),
        ],
        responses={200: s.JobEventsSerializer, **errors(400, 403, 404)},
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = self.own_job(job_id)
        after = int_query_param(request, "after", default=-1, low=-1, high=2**31 - 1)
        limit = int_query_param(request, "limit", default=1000, low=1, high=1000)
        events = selectors.job_events(job=job, after=after, limit=limit)
        return Response(
            {
                "job_state": job.state,
                "events": s.JobEventSerializer(events, many=True).data,
                "last_counter": events[-1].counter if events else after,
            }
        )


class JobCancelView(AccountView, APIView):
    @extend_schema(
        request=None,
        parameters=[_id_parameter("job_id")],
        responses={202: s.JobSerializer, **errors(403, 404, 409)},
    )
    def post(self, request: Request, job_id: int) -> Response:
        job = jobs.job_cancel(job=self.own_job(job_id))
        return Response(s.JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


# ---- API tokens -----------------------------------------------------------------------------


class TokenListView(AccountView, generics.ListCreateAPIView):
    serializer_class = s.TokenSerializer

    def get_queryset(self):
        return account_selectors.token_list(account=self.account)

    @extend_schema(responses={200: s.TokenSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=s.TokenCreateSerializer,
        responses={201: s.CreatedTokenSerializer, **errors(400, 403)},
    )
    def post(self, request: Request, *args, **kwargs) -> Response:
        data = s.TokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        created = account_services.token_create(
            account=self.account, user=request.user, name=data.validated_data["name"]
        )
        body = s.TokenSerializer(created.token).data
        body["token"] = created.secret
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailView(AccountView, APIView):
    @extend_schema(
        parameters=[_id_parameter("token_id")], responses={204: None, **errors(403, 404)}
    )
    def delete(self, request: Request, token_id: int) -> Response:
        token = None
        if 1 <= token_id <= MAX_ID:
            token = account_selectors.token_get(account=self.account, token_id=token_id)
        if token is None:
            raise NotFound("No such token in your account.")
        account_services.token_revoke(token=token)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- enrollment -----------------------------------------------------------------------------


class EnrollmentListView(AccountView, generics.ListCreateAPIView):
    serializer_class = s.EnrollmentSerializer

    def get_queryset(self):
        return selectors.enrollment_list(account=self.account)

    @extend_schema(responses={200: s.EnrollmentSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(request=None, responses={201: s.EnrollmentCreatedSerializer, **errors(403)})
    def post(self, request: Request, *args, **kwargs) -> Response:
        subscriptions.order_check(
            account=self.account,
            plan=subscriptions.plan_for_order(plan_id=None, node_kind=Plan.NodeKind.ENROLLED),
        )
        created = enrollment.enrollment_create(account=self.account, user=request.user)
        url = f"{settings.PUBLIC_URL}/enroll/{created.secret}/install.sh"
        return Response(
            {
                "id": created.enrollment.pk,
                "url": url,
                "command": f"curl -fsSL {url} | sh",
                "expires_at": created.enrollment.expires_at,
            },
            status=status.HTTP_201_CREATED,
        )


class NodeSecretAuthentication(BaseAuthentication):
    """Names the heartbeat's credential, `Authorization: Bearer <node secret>` (the OpenAPI
    `nodeSecret` scheme, accounts.schema), and makes a refusal say how to authenticate. The
    secret belongs to the node named in the body, so the view itself checks it, first."""

    def authenticate(self, request):
        return None

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="agent"'


class AgentView(APIView):
    """Called by node agents, authenticated by their own secrets (never a customer's token)."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_scope = "agent"
    parser_classes = [JSONParser]

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, FleetError):
            response = service_error_response(exc)
            if exc.status == 401:
                response["WWW-Authenticate"] = 'Bearer realm="agent"'
            return response
        return super().handle_exception(exc)


class EnrollView(AgentView):
    """The deploy script's `vtpu enroll`: authenticated by the one-time secret in the body."""

    @extend_schema(
        request=s.EnrollSerializer,
        responses={201: s.EnrolledSerializer, **errors(400, 403, 404, 410)},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        data = s.EnrollSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        enrolled = enrollment.enrollment_complete(
            secret=data.validated_data["secret"],
            hostname=data.validated_data["hostname"],
            agent_url=data.validated_data.get("agent_url"),
            port=data.validated_data.get("port"),
        )
        subscriptions.enrolled_node_bill(node=enrolled.node)
        return Response(
            {
                "node_id": str(enrolled.node.pk),
                "node_secret": enrolled.secret,
                "access_token_sha256": enrolled.node.access_token_sha256,
                "heartbeat_seconds": settings.HEARTBEAT_SECONDS,
                "control_plane_url": settings.PUBLIC_URL,
            },
            status=status.HTTP_201_CREATED,
        )


class HeartbeatView(AgentView):
    """An agent's heartbeat, authenticated by its node secret before anything else."""

    authentication_classes = [NodeSecretAuthentication]

    @extend_schema(
        request=s.HeartbeatSerializer,
        responses={200: s.HeartbeatReplySerializer, **errors(400, 410)},
        auth=[{"nodeSecret": []}],
    )
    def post(self, request: Request) -> Response:
        scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
        secret = secret.strip() if scheme.lower() == "bearer" else ""
        data = s.HeartbeatSerializer(data=request.data)
        valid = data.is_valid()
        node_id = data.validated_data.get("node_id") if valid else None
        # Authenticate first: a stranger learns nothing, not even which input was wrong.
        if not secret or node_id is None:
            node_id = _node_id_from(request.data)
        node = heartbeats.authenticate_node(node_id=node_id, secret=secret)
        if not valid:
            return Response(data.errors, status=status.HTTP_400_BAD_REQUEST)
        reply = heartbeats.heartbeat_accept(
            node=node,
            version=data.validated_data.get("version", ""),
            agent_url=data.validated_data.get("agent_url"),
            telemetry=data.validated_data.get("telemetry"),
            results=data.validated_data.get("results", []),
        )
        return Response(reply)


def _node_id_from(raw: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(raw.get("node_id")))  # type: ignore[union-attr]
    except (AttributeError, ValueError, TypeError):
        return None


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """Django's 404 (`handler404`) for a URL no route matches, such as a node id that is no
    UUID: under /api/ it is JSON like every other API answer, elsewhere Django's page."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"detail": "No such URL in this API (see /api/v1/schema/)."}, status=404
        )
    return page_not_found(request, exception)


# ---- the one-click install script and the wheel (plain Django: not JSON) --------------------

WHEEL_NAME = re.compile(r"^vtpu-[A-Za-z0-9_.+-]+\.whl$")


def _usable_or_404(secret: str) -> None:
    try:
        enrollment.enrollment_usable(secret=secret)
    except FleetError as exc:
        raise Http404(exc.message) from None


def install_script(request: HttpRequest, secret: str) -> HttpResponse:
    """The deploy script with this link's values filled in; 404 once used or expired."""
    from fleet.wheel import node_wheel_path, node_wheel_sha256

    _usable_or_404(secret)
    template = settings.PROVISIONING_DIR / "deploy" / "install.sh"
    if not template.is_file():
        return HttpResponse(
            f"echo 'The control plane has no install script ({template} is missing).' >&2\n"
            "exit 1\n",
            status=503,
            content_type="text/x-shellscript",
        )
    wheel_url = f"{settings.PUBLIC_URL}/enroll/{secret}/{node_wheel_path().name}"
    script = (
        template.read_text()
        .replace("@CONTROL_PLANE_URL@", settings.PUBLIC_URL)
        .replace("@ENROLL_SECRET@", secret)
        .replace("@WHEEL_URL@", wheel_url)
        .replace("@WHEEL_SHA256@", node_wheel_sha256())
    )
    return HttpResponse(script, content_type="text/x-shellscript")


def wheel_download(request: HttpRequest, secret: str, filename: str) -> FileResponse:
    from fleet.wheel import node_wheel_path

    _usable_or_404(secret)
    wheel = node_wheel_path()
    if not WHEEL_NAME.match(filename) or filename != wheel.name:
        raise Http404(f"This control plane serves {wheel.name}.")
    return FileResponse(
        wheel.open("rb"), as_attachment=True, filename=wheel.name, content_type="application/zip"
    )


# ---- monitoring: uptime, flips, maintenance windows, the account's SLA report ---------------

MONTH = re.compile(r"^(20\d\d)-(0[1-9]|1[0-2])$")
MONTH_PARAMETER = OpenApiParameter(
    "month",
    {"type": "string", "pattern": MONTH.pattern},
    description="YYYY-MM (UTC); default: this month.",
)


def _month(request: Request) -> date:
    raw = request.query_params.get("month")
    if raw is None:
        now = timezone.now()
        return date(now.year, now.month, 1)
    found = MONTH.match(raw)
    if not found:
        raise ValidationError({"month": [f"month is YYYY-MM (2000-2099), not {raw!r}."]})
    return date(int(found[1]), int(found[2]), 1)


def _uptime(value: uptime.Uptime) -> dict:
    return {
        "start": value.start,
        "end": value.end,
        "uptime_ratio": value.ratio,
        "up_seconds": value.up_seconds,
        "down_seconds": value.down_seconds,
        "maintenance_seconds": value.maintenance_seconds,
        "excluded_seconds": value.excluded_seconds,
    }


class NodeUptimeView(AccountView, APIView):
    @extend_schema(
        parameters=[MONTH_PARAMETER],
        responses={200: s.NodeUptimeSerializer, **errors(400, 403, 404)},
    )
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        node = self.own_node(node_id)
        month, now = _month(request), timezone.now()
        return Response(
            {
                "month": f"{month:%Y-%m}",
                "sla_target": monitoring_services.sla_terms(node)[0],
                "this_month": _uptime(uptime.node_uptime_month(node, month, now=now)),
                "last_30_days": _uptime(uptime.node_uptime_30_days(node, now=now)),
            }
        )


class NodeFlipsView(AccountView, APIView):
    """Every change of the node between up and down, with its time and cause."""

    @extend_schema(responses={200: s.FlipSerializer(many=True), **errors(403, 404)})
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        flips = uptime.node_flips(self.own_node(node_id))
        return Response(
            [{"at": f.at, "up": f.up, "cause": f.cause, "category": f.category} for f in flips]
        )


class NodeMaintenanceView(AccountView, APIView):
    """Planned maintenance that applies to the node (its own, its host's, the fleet's), past and
    coming; downtime inside it does not count against the SLA."""

    @extend_schema(responses={200: s.MaintenanceWindowSerializer(many=True), **errors(403, 404)})
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        windows = uptime.windows_for(self.own_node(node_id))
        return Response(
            [
                {
                    "id": w.pk,
                    "scope": "node" if w.node_id else "host" if w.host_id else "fleet",
                    "starts_at": w.starts_at,
                    "ends_at": w.ends_at,
                    "reason": w.reason,
                }
                for w in windows
            ]
        )


class SlaReportView(AccountView, APIView):
    """The account's monthly SLA report: each node's uptime that month, and its credit once the
    month has closed below the target."""

    @extend_schema(
        parameters=[MONTH_PARAMETER], responses={200: s.SlaReportSerializer, **errors(400, 403)}
    )
    def get(self, request: Request) -> Response:
        month, now = _month(request), timezone.now()
        start, end = uptime.month_bounds(month)
        credits = {
            c.node_id: c.credit_percent
            for c in SlaCredit.objects.filter(account=self.account, month=month)
        }
        rows = []
        month_total, days_total = [], []
        for node in (
            selectors.node_list(account=self.account).filter(created__lt=end).select_related("plan")
        ):
            value = uptime.node_uptime_month(node, month, now=now)
            month_total.append(value)
            days_total.append(uptime.node_uptime_30_days(node, now=now))
            ratio = value.ratio
            target = monitoring_services.sla_terms(node)[0]
            rows.append(
                {
                    "node": node.pk,
                    "name": node.name,
                    "uptime_ratio": ratio,
                    "down_seconds": value.down_seconds,
                    "sla_target": target,
                    "meets_sla": None if ratio is None else ratio >= target,
                    "credit_percent": credits.get(node.pk),
                }
            )
        return Response(
            {
                "month": f"{month:%Y-%m}",
                "sla_target": settings.SLA_TARGET,
                "closed": SlaMonthClosed.objects.filter(month=month).exists(),
                "account": {
                    "this_month": uptime.combined_ratio(month_total),
                    "last_30_days": uptime.combined_ratio(days_total),
                    "down_seconds_this_month": sum(u.down_seconds for u in month_total),
                },
                "results": rows,
            }
        )


# ---- alerts and their channels --------------------------------------------------------------

ALERT_STATE_PARAMETER = OpenApiParameter(
    "state", {"type": "string", "enum": ["open", "resolved"]}, description="Only these alerts."
)
ALERT_NODE_PARAMETER = OpenApiParameter(
    "node", {"type": "string", "format": "uuid"}, description="Only this node's alerts."
)


class AlertListView(AccountView, generics.ListAPIView):
    """The account's alerts, newest first: open ones and their history."""

    serializer_class = s.AlertSerializer

    def get_queryset(self):
        rows = Alert.objects.filter(account=self.account).select_related("node")
        state = self.request.query_params.get("state")
        if state is not None:
            if state not in Alert.State.values:
                raise ValidationError({"state": [f"must be one of {Alert.State.values}"]})
            rows = rows.filter(state=state)
        node = self.request.query_params.get("node")
        if node is not None:
            try:
                rows = rows.filter(node_id=uuid.UUID(node))
            except ValueError:
                raise ValidationError({"node": ["must be a node id (a UUID)"]}) from None
        return rows

    @extend_schema(
        parameters=[ALERT_STATE_PARAMETER, ALERT_NODE_PARAMETER],
        responses={200: s.AlertSerializer(many=True), **errors(400, 403)},
    )
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class AlertDetailView(AccountView, APIView):
    """One alert with every message sent about it and each delivery attempt."""

    @extend_schema(
        parameters=[_id_parameter("alert_id")],
        responses={200: s.AlertDetailSerializer, **errors(403, 404)},
    )
    def get(self, request: Request, alert_id: int) -> Response:
        alert = None
        if 1 <= alert_id <= MAX_ID:
            alert = (
                Alert.objects.filter(account=self.account, pk=alert_id)
                .select_related("node")
                .prefetch_related("notifications__delivery_attempts", "notifications__channel")
                .first()
            )
        if alert is None:
            raise NotFound("No such alert in your account.")
        return Response(s.AlertDetailSerializer(alert).data)


class AlertChannelListView(AccountView, generics.ListCreateAPIView):
    """Where the account's alerts go: e-mail addresses and signed webhooks."""

    serializer_class = s.AlertChannelSerializer

    def get_queryset(self):
        return AlertChannel.objects.filter(account=self.account)

    @extend_schema(responses={200: s.AlertChannelSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=PolymorphicProxySerializer(
            "AlertChannelCreate",
            serializers={
                "email": s.EmailChannelCreateSerializer,
                "webhook": s.WebhookChannelCreateSerializer,
            },
            resource_type_field_name="kind",
        ),
        responses={201: s.AlertChannelWithSecretSerializer, **errors(400, 403, 409)},
    )
    def post(self, request: Request, *args, **kwargs) -> Response:
        data = s.AlertChannelCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        channel = monitoring_services.channel_create(account=self.account, **data.validated_data)
        body = s.AlertChannelSerializer(channel).data
        body["secret"] = channel.secret
        return Response(body, status=status.HTTP_201_CREATED)


class AlertChannelDetailView(AccountView, APIView):
    def _channel(self, channel_id: int) -> AlertChannel:
        channel = None
        if 1 <= channel_id <= MAX_ID:
            channel = AlertChannel.objects.filter(account=self.account, pk=channel_id).first()
        if channel is None:
            raise NotFound("No such alert channel in your account.")
        return channel

    @extend_schema(
        parameters=[_id_parameter("channel_id")],
        responses={200: s.AlertChannelSerializer, **errors(403, 404)},
    )
    def get(self, request: Request, channel_id: int) -> Response:
        return Response(s.AlertChannelSerializer(self._channel(channel_id)).data)

    @extend_schema(
        parameters=[_id_parameter("channel_id")],
        request=s.AlertChannelUpdateSerializer,
        responses={200: s.AlertChannelWithSecretSerializer, **errors(400, 403, 404)},
    )
    def patch(self, request: Request, channel_id: int) -> Response:
        channel = self._channel(channel_id)
        data = s.AlertChannelUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        monitoring_services.channel_update(
            channel=channel,
            name=v.get("name"),
            target=v.get("target"),
            enabled=v.get("enabled"),
            rotate_secret=v.get("rotate_secret", False),
        )
        body = s.AlertChannelSerializer(channel).data
        body["secret"] = channel.secret if v.get("rotate_secret") else ""
        return Response(body)

    @extend_schema(
        parameters=[_id_parameter("channel_id")], responses={204: None, **errors(403, 404)}
    )
    def delete(self, request: Request, channel_id: int) -> Response:
        self._channel(channel_id).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- monitoring: continuous benchmarks ------------------------------------------------------


class BenchmarkNodeView(AccountView):
    """A node's benchmarks: its customer's, and any node's for staff (operators look into a
    node's speed without borrowing the customer's token; their runs say `trigger: staff`)."""

    def benchmark_node(self, node_id: uuid.UUID) -> Node:
        if self.request.user.is_staff:
            node = Node.objects.filter(pk=node_id).first()
            if node is None:
                raise NotFound("No such node in your account or the fleet.")
            return node
        return self.own_node(node_id)


class NodeBenchmarksView(BenchmarkNodeView, generics.ListAPIView):
    """The node's benchmark runs, newest first, with each workload's figures and sources;
    skipped and failed runs say why."""

    serializer_class = s.BenchmarkRunSerializer

    def get_queryset(self):
        return benchmarks.benchmark_run_list(node=self.benchmark_node(self.kwargs["node_id"]))

    @extend_schema(responses={200: s.BenchmarkRunSerializer(many=True), **errors(400, 403, 404)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=s.BenchmarkRequestSerializer,
        responses={201: s.BenchmarkRunSerializer, **errors(400, 403, 404, 409)},
    )
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        """Benchmark the node now (through its heartbeats); 409 while one is pending or when
        the node is not ready."""
        node = self.benchmark_node(node_id)
        data = s.BenchmarkRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run = benchmarks.benchmark_request(
            node=node,
            by=request.user,
            workloads=data.validated_data.get("workloads"),
            size=data.validated_data.get("size"),
        )
        return Response(s.BenchmarkRunSerializer(run).data, status=status.HTTP_201_CREATED)


class NodeBenchmarkStatsView(BenchmarkNodeView, APIView):
    """Per workload, the rolling statistics of the node's completed, correct results: count,
    median, p25/p75 and min/max of the speedup, ops/cycle and ops/s."""

    @extend_schema(
        parameters=[_int_parameter("days", 1, 90, "The window, in days back from now (7).")],
        responses={200: s.NodeBenchmarkStatsSerializer, **errors(400, 403, 404)},
    )
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        node = self.benchmark_node(node_id)
        days = int_query_param(request, "days", default=7, low=1, high=90)
        now = timezone.now()
        return Response(
            {
                "node": node.pk,
                "days": days,
                "since": now - timedelta(days=days),
                "until": now,
                "workloads": benchmarks.node_benchmark_stats(node, now=now, days=days),
            }
        )


# ---- billing --------------------------------------------------------------------------------


def _card(customer: BillingCustomer | None) -> dict | None:
    if customer is None or not customer.payment_method_id:
        return None
    return {"brand": customer.card_brand, "last4": customer.card_last4, "exp": customer.card_exp}


def _billing(account: Account) -> dict:
    customer = BillingCustomer.objects.filter(account=account).first()
    since = customer.past_due_since if customer else None
    return {
        "enabled": subscriptions.billing_enabled(),
        "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "stripe_js_url": settings.STRIPE_JS_URL,
        "card": _card(customer),
        "standing": customer.standing if customer else BillingCustomer.Standing.GOOD,
        "past_due_since": since,
        "suspend_at": since + timedelta(days=settings.BILLING_GRACE_DAYS) if since else None,
        "deprovision_at": (
            since + timedelta(days=settings.BILLING_DEPROVISION_DAYS) if since else None
        ),
        "cancel_requested_at": customer.cancel_requested_at if customer else None,
        "subscriptions": s.SubscriptionSerializer(
            account.subscriptions.order_by("-created"), many=True
        ).data,
    }


class BillingView(AccountView, APIView):
    """The account's billing: its card (brand and last digits), standing, subscriptions."""

    @extend_schema(responses={200: s.BillingSerializer, **errors(403)})
    def get(self, request: Request) -> Response:
        return Response(_billing(self.account))


class PlanListView(AccountView, generics.ListAPIView):
    """The plans a node can be ordered on."""

    serializer_class = s.PlanSerializer

    def get_queryset(self):
        return Plan.objects.filter(active=True).order_by("node_kind", "amount_cents", "pk")

    @extend_schema(responses={200: s.PlanSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class SetupIntentView(AccountView, APIView):
    """Start saving a card: the browser confirms it with Stripe.js (`confirmCardSetup`)."""

    @extend_schema(request=None, responses={201: s.SetupIntentSerializer, **errors(403, 502, 503)})
    def post(self, request: Request) -> Response:
        intent = billing_services.setup_intent_create(account=self.account)
        return Response(
            {
                "id": intent.id,
                "client_secret": intent.client_secret,
                "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
                "stripe_js_url": settings.STRIPE_JS_URL,
            },
            status=status.HTTP_201_CREATED,
        )


class PaymentMethodView(AccountView, APIView):
    """Save the card of a confirmed SetupIntent as the account's default (read from Stripe)."""

    @extend_schema(
        request=s.PaymentMethodSaveSerializer,
        responses={200: s.SavedCardSerializer, **errors(400, 403, 404, 409, 502, 503)},
    )
    def post(self, request: Request) -> Response:
        data = s.PaymentMethodSaveSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        customer = billing_services.payment_method_save(
            account=self.account, setup_intent_id=data.validated_data["setup_intent"]
        )
        return Response({"card": _card(customer)})


class InvoiceListView(AccountView, generics.ListAPIView):
    """The account's invoices, newest first, each with its payment."""

    serializer_class = s.InvoiceSerializer

    def get_queryset(self):
        return Invoice.objects.filter(account=self.account).order_by("-stripe_created", "-id")

    @extend_schema(responses={200: s.InvoiceSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class InvoicePayView(AccountView, APIView):
    """Pay an open invoice with the account's card (after saving a new one)."""

    @extend_schema(
        parameters=[_id_parameter("invoice_id")],
        request=None,
        responses={200: s.InvoiceSerializer, **errors(402, 403, 404, 409, 502, 503)},
    )
    def post(self, request: Request, invoice_id: int) -> Response:
        invoice = None
        if 1 <= invoice_id <= MAX_ID:
            invoice = Invoice.objects.filter(account=self.account, pk=invoice_id).first()
        if invoice is None:
            raise NotFound("No such invoice in your account.")
        paid = subscriptions.invoice_pay(account=self.account, invoice=invoice)
        return Response(s.InvoiceSerializer(paid).data)


class BillingCancelView(AccountView, APIView):
    """Cancel the account: nodes run until the end of the paid period, then are deprovisioned.
    DELETE takes the cancellation back before then."""

    @extend_schema(request=None, responses={202: s.BillingSerializer, **errors(403, 502, 503)})
    def post(self, request: Request) -> Response:
        subscriptions.account_cancel(account=self.account, user=request.user)
        return Response(_billing(self.account), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={200: s.BillingSerializer, **errors(403, 409, 502, 503)})
    def delete(self, request: Request) -> Response:
        subscriptions.account_cancel_undo(account=self.account)
        return Response(_billing(self.account))


class ReconciliationIssueListView(generics.ListAPIView):
    """Staff only: what billing's reconciliation found and could not repair."""

    serializer_class = s.ReconciliationIssueSerializer
    permission_classes = [IsAdminUser]

    def get_queryset(self):
        return ReconciliationIssue.objects.filter(resolved_at=None).order_by("-last_seen", "-id")

    @extend_schema(responses={200: s.ReconciliationIssueSerializer(many=True), **errors(400, 403)})
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


# ---- economics (staff only) -----------------------------------------------------------------


class StaffOnly(IsAdminUser):
    message = "Staff only: the economics are the operator's."


class EconomicsView(APIView):
    """The economics of the current fleet (billing.economics): cost per trillion ops, break-even
    per host, 3-year ROI of the seed's scenarios, revenue, MRR history; each figure with its
    inputs, assumptions and sources, or null with its reason."""

    permission_classes = [StaffOnly]

    @extend_schema(
        parameters=[
            _int_parameter("days", 1, economics.MAX_DAYS, "Telemetry window in days back (30).")
        ],
        responses={200: s.EconomicsReportSerializer, **errors(400, 403)},
    )
    def get(self, request: Request) -> Response:
        days = int_query_param(
            request, "days", default=economics.DEFAULT_DAYS, low=1, high=economics.MAX_DAYS
        )
        return Response(economics.jsonable(economics.economics_report(days=days)))


class EconomicAssumptionsView(APIView):
    """The staff's economic assumptions; PUT records new ones (any subset; the rest are kept)
    with who changed them."""

    permission_classes = [StaffOnly]
    parser_classes = [JSONParser]

    @extend_schema(responses={200: s.EconomicAssumptionsSerializer, **errors(403)})
    def get(self, request: Request) -> Response:
        row = economics.assumptions_current()
        return Response(s.EconomicAssumptionsSerializer(row).data)

    @extend_schema(
        request=s.EconomicAssumptionsSerializer,
        responses={200: s.EconomicAssumptionsSerializer, **errors(400, 403)},
    )
    def put(self, request: Request) -> Response:
        data = s.EconomicAssumptionsSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        row = economics.assumptions_record(by=request.user, values=data.validated_data)
        return Response(s.EconomicAssumptionsSerializer(row).data)
