"""Reads for the fleet. Every customer-facing read takes the account: another account's node,
job or enrollment simply does not exist for it (404, not 403, so ids reveal nothing)."""

import uuid

from django.db.models import QuerySet

from accounts.models import Account
from fleet.models import (
    Enrollment,
    JobEvent,
    Node,
    NodeAction,
    NodeTransition,
    ProvisioningJob,
    TelemetrySample,
)


def node_list(*, account: Account) -> QuerySet[Node]:
    return Node.objects.filter(account=account).select_related("host")


def node_get(*, account: Account, node_id: uuid.UUID) -> Node | None:
    return node_list(account=account).filter(pk=node_id).first()


def job_list(*, node: Node) -> QuerySet[ProvisioningJob]:
    return ProvisioningJob.objects.filter(node=node)


def job_get(*, account: Account, job_id: int) -> ProvisioningJob | None:
    return (
        ProvisioningJob.objects.filter(pk=job_id, node__account=account)
        .select_related("node")
        .first()
    )


def job_events(*, job: ProvisioningJob, after: int = -1, limit: int = 1000) -> list[JobEvent]:
    """Events after a counter, oldest first: a live log polls with the last counter it has."""
    return list(JobEvent.objects.filter(job=job, counter__gt=after).order_by("counter")[:limit])


def telemetry_recent(*, node: Node, limit: int = 60) -> list[TelemetrySample]:
    return list(TelemetrySample.objects.filter(node=node).order_by("-created", "-id")[:limit])


def transition_list(*, node: Node) -> QuerySet[NodeTransition]:
    return NodeTransition.objects.filter(node=node).order_by("created", "id")


def action_list(*, node: Node) -> QuerySet[NodeAction]:
    return NodeAction.objects.filter(node=node).order_by("-created", "-id")


def enrollment_list(*, account: Account) -> QuerySet[Enrollment]:
    return Enrollment.objects.filter(account=account)
