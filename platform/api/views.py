"""API handlers: parse input, call one service or selector, render.

Another customer's node, job or token is answered 404 exactly like one that does not exist.
A service's refusal (fleet.services.FleetError) becomes its HTTP status with the sentence for
people; a bad field becomes 400 with the reason under that field's name.
"""

from __future__ import annotations

import re
import uuid

from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import selectors as account_selectors
from accounts import services as account_services
from api import serializers as s
from fleet import selectors, services
from fleet.models import Node, ProvisioningJob
from fleet.services import FleetError


def fleet_error_response(exc: FleetError) -> Response:
    body: dict = {"detail": exc.message}
    if exc.field:
        body[exc.field] = [exc.message]
    return Response(body, status=exc.status)


class FleetErrorsMixin:
    """Turns a service's refusal into an HTTP answer (settings stay the lead's: no global
    exception handler is needed for this)."""

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, FleetError):
            return fleet_error_response(exc)
        return super().handle_exception(exc)  # type: ignore[misc]


def _own_node(request: Request, node_id: uuid.UUID) -> Node:
    node = selectors.node_get(customer=request.user, node_id=node_id)
    if node is None:
        raise NotFound("No such node in your account.")
    return node


def _own_job(request: Request, job_id: int) -> ProvisioningJob:
    job = selectors.job_get(customer=request.user, job_id=job_id)
    if job is None:
        raise NotFound("No such job in your account.")
    return job


# ---- nodes ----------------------------------------------------------------------------------


class NodeListView(FleetErrorsMixin, generics.GenericAPIView):
    serializer_class = s.NodeSerializer

    def get_queryset(self):
        return selectors.node_list(customer=self.request.user)

    @extend_schema(responses=s.NodeSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.NodeSerializer(page, many=True).data)

    @extend_schema(request=s.NodeCreateSerializer, responses={201: s.NodeSerializer})
    def post(self, request: Request) -> Response:
        data = s.NodeCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        requested = services.node_request(
            customer=request.user,
            name=data.validated_data["name"],
            host=data.validated_data.get("host"),
        )
        return Response(s.NodeSerializer(requested.node).data, status=status.HTTP_201_CREATED)


class NodeDetailView(FleetErrorsMixin, APIView):
    @extend_schema(responses=s.NodeSerializer)
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        return Response(s.NodeSerializer(_own_node(request, node_id)).data)

    @extend_schema(request=None, responses={202: s.NodeSerializer})
    def delete(self, request: Request, node_id: uuid.UUID) -> Response:
        node = _own_node(request, node_id)
        services.node_deprovision(
            node=node, cause=f"deleted by {request.user.get_username()} through the API"
        )
        node.refresh_from_db()
        return Response(s.NodeSerializer(node).data, status=status.HTTP_202_ACCEPTED)


class NodeRetryView(FleetErrorsMixin, APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer})
    def post(self, request: Request, node_id: uuid.UUID) -> Response:
        job = services.node_retry(node=_own_node(request, node_id))
        return Response(s.JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class NodeCredentialsView(FleetErrorsMixin, APIView):
    """The node's agent URL and token, for calling its agent (benchmarks, embeddings)."""

    @extend_schema(responses=s.NodeCredentialsSerializer)
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        node = _own_node(request, node_id)
        return Response({"agent_url": node.agent_url, "token": node.token})


class NodeJobsView(FleetErrorsMixin, generics.GenericAPIView):
    serializer_class = s.JobSerializer

    @extend_schema(responses=s.JobSerializer(many=True))
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        jobs = selectors.job_list(node=_own_node(request, node_id))
        page = self.paginate_queryset(jobs)
        return self.get_paginated_response(s.JobSerializer(page, many=True).data)


class NodeTelemetryView(FleetErrorsMixin, APIView):
    @extend_schema(
        parameters=[OpenApiParameter("limit", int, description="Samples, newest first (<=500).")],
        responses=s.TelemetrySampleSerializer(many=True),
    )
    def get(self, request: Request, node_id: uuid.UUID) -> Response:
        node = _own_node(request, node_id)
        limit = _int_param(request, "limit", default=60, low=1, high=500)
        samples = selectors.telemetry_recent(node=node, limit=limit)
        return Response(
            {
                "latest": node.last_telemetry,
                "samples": s.TelemetrySampleSerializer(samples, many=True).data,
            }
        )


def _int_param(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FleetErrorParam(name, f"{name} must be an integer, not {raw!r}.") from None
    if not low <= value <= high:
        raise FleetErrorParam(name, f"{name} must be between {low} and {high}.")
    return value


class FleetErrorParam(services.InvalidInput):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


# ---- jobs -----------------------------------------------------------------------------------


class JobDetailView(FleetErrorsMixin, APIView):
    @extend_schema(responses=s.JobDetailSerializer)
    def get(self, request: Request, job_id: int) -> Response:
        return Response(s.JobDetailSerializer(_own_job(request, job_id)).data)


class JobEventsView(FleetErrorsMixin, APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("after", int, description="Only events after this counter."),
            OpenApiParameter("limit", int, description="At most this many (<=1000)."),
        ],
        responses=s.JobEventSerializer(many=True),
    )
    def get(self, request: Request, job_id: int) -> Response:
        job = _own_job(request, job_id)
        after = _int_param(request, "after", default=-1, low=-1, high=2**31)
        limit = _int_param(request, "limit", default=1000, low=1, high=1000)
        events = selectors.job_events(job=job, after=after, limit=limit)
        return Response(
            {
                "job_state": job.state,
                "events": s.JobEventSerializer(events, many=True).data,
                "last_counter": events[-1].counter if events else after,
            }
        )


class JobCancelView(FleetErrorsMixin, APIView):
    @extend_schema(request=None, responses={202: s.JobSerializer})
    def post(self, request: Request, job_id: int) -> Response:
        job = services.job_cancel(job=_own_job(request, job_id))
        return Response(s.JobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


# ---- API tokens -----------------------------------------------------------------------------


class TokenListView(generics.GenericAPIView):
    serializer_class = s.TokenSerializer

    def get_queryset(self):
        return account_selectors.token_list(user=self.request.user)

    @extend_schema(responses=s.TokenSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(s.TokenSerializer(page, many=True).data)

    @extend_schema(request=s.TokenCreateSerializer, responses={201: s.CreatedTokenSerializer})
    def post(self, request: Request) -> Response:
        data = s.TokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        created = account_services.token_create(user=request.user, name=data.validated_data["name"])
        body = s.TokenSerializer(created.token).data
        body["token"] = created.secret
        return Response(body, status=status.HTTP_201_CREATED)


class TokenDetailView(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, token_id: int) -> Response:
        token = account_selectors.token_get(user=request.user, token_id=token_id)
        if token is None:
            raise NotFound("No such token in your account.")
        account_services.token_revoke(token=token)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- enrollment -----------------------------------------------------------------------------


class EnrollmentCreateView(APIView):
    @extend_schema(request=None, responses={201: s.EnrollmentCreatedSerializer})
    def post(self, request: Request) -> Response:
        created = services.enrollment_create(customer=request.user)
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


class EnrollView(FleetErrorsMixin, APIView):
    """The deploy script's `vtpu enroll`: authenticated by the one-time secret in the body."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(request=s.EnrollSerializer, responses={201: s.EnrolledSerializer})
    def post(self, request: Request) -> Response:
        data = s.EnrollSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        enrolled = services.enrollment_complete(
            secret=data.validated_data["secret"],
            hostname=data.validated_data["hostname"],
            agent_url=data.validated_data.get("agent_url"),
            port=data.validated_data.get("port"),
        )
        return Response(
            {
                "node_id": str(enrolled.node.pk),
                "node_token": enrolled.token,
                "heartbeat_seconds": settings.HEARTBEAT_SECONDS,
                "control_plane_url": settings.PUBLIC_URL,
            },
            status=status.HTTP_201_CREATED,
        )


class HeartbeatView(FleetErrorsMixin, APIView):
    """An agent's heartbeat, authenticated by its node token (not a customer's API token)."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(request=s.HeartbeatSerializer, responses=s.HeartbeatReplySerializer)
    def post(self, request: Request) -> Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Response(
                {"detail": "Send the node token as 'Authorization: Bearer <token>'."},
                status=status.HTTP_401_UNAUTHORIZED,
                headers={"WWW-Authenticate": 'Bearer realm="agent"'},
            )
        data = s.HeartbeatSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        reply = services.heartbeat_record(
            node_id=data.validated_data["node_id"],
            token=token.strip(),
            version=data.validated_data.get("version", ""),
            agent_url=data.validated_data.get("agent_url"),
            telemetry=data.validated_data.get("telemetry"),
            results=data.validated_data.get("results", []),
        )
        return Response(reply)


# ---- the one-click install script and the wheel (plain Django: not JSON) --------------------

WHEEL_NAME = re.compile(r"^vtpu-[A-Za-z0-9_.+-]+\.whl$")


def _usable_or_404(secret: str) -> None:
    try:
        services.enrollment_usable(secret=secret)
    except FleetError as exc:
        raise Http404(exc.message) from None


def install_script(request: HttpRequest, secret: str) -> HttpResponse:
    """The deploy script with this link's values filled in; 404 once used or expired."""
    from fleet.wheel import node_wheel_path

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
