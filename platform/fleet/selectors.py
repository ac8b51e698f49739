"""Reads for the fleet. Every customer-facing read takes the customer: another customer's node
or job simply does not exist for them (404, not 403, so ids reveal nothing)."""

import uuid

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from fleet.models import JobEvent, Node, ProvisioningJob, TelemetrySample


def node_list(*, customer: AbstractBaseUser) -> QuerySet[Node]:
    return Node.objects.filter(customer=customer).select_related("host")


def node_get(*, customer: AbstractBaseUser, node_id: uuid.UUID) -> Node | None:
    return node_list(customer=customer).filter(pk=node_id).first()


def job_list(*, node: Node) -> QuerySet[ProvisioningJob]:
    return ProvisioningJob.objects.filter(node=node)


def job_get(*, customer: AbstractBaseUser, job_id: int) -> ProvisioningJob | None:
    return (
        ProvisioningJob.objects.filter(pk=job_id, node__customer=customer)
        .select_related("node")
        .first()
    )


def job_events(*, job: ProvisioningJob, after: int = -1, limit: int = 1000) -> list[JobEvent]:
    """Events after a counter, oldest first: a live log polls with the last counter it has."""
    return list(JobEvent.objects.filter(job=job, counter__gt=after).order_by("counter")[:limit])


def telemetry_recent(*, node: Node, limit: int = 60) -> list[TelemetrySample]:
    return list(TelemetrySample.objects.filter(node=node).order_by("-created", "-id")[:limit])
