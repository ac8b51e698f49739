"""One-time links that turn a customer's own machine into a node of their account.

The link's secret is in the install URL; only its hash is stored. Completing it creates the node
(kind enrolled, `requested` until its first heartbeat) with a node secret handed to the machine
once, and counts against the account's quota like any other node.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import Account, User
from fleet.models import Enrollment, Node
from fleet.services.credentials import hash_secret, new_access_token, new_secret
from fleet.services.errors import Gone, NotFound
from fleet.services.nodes import LIVE, check_quota
from fleet.services.transitions import record_birth


@dataclass(frozen=True)
class CreatedEnrollment:
    enrollment: Enrollment
    secret: str  # in the install URL; only its hash is stored


@transaction.atomic
def enrollment_create(*, account: Account, user: User) -> CreatedEnrollment:
    check_quota(account)  # say so now, not after the customer ran the script
    secret, digest = new_secret(24)
    enrollment = Enrollment.objects.create(
        account=account,
        created_by=user,
        secret_sha256=digest,
        expires_at=timezone.now() + timedelta(seconds=settings.ENROLLMENT_TTL_SECONDS),
    )
    return CreatedEnrollment(enrollment=enrollment, secret=secret)


def _unique_node_name(account: Account, hostname: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-")[:55] or "node"
    name, n = base, 1
    while Node.objects.filter(LIVE, account=account, name=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass(frozen=True)
class EnrolledNode:
    node: Node
    secret: str  # the node secret, handed to the agent once; only its hash is stored


def enrollment_usable(*, secret: str) -> Enrollment:
    """The enrollment of `secret` if it can still be used: NotFound if unknown, Gone if used or
    expired."""
    digest = hash_secret(secret or "")
    enrollment = Enrollment.objects.filter(secret_sha256=digest).first()
    if enrollment is None or not hmac.compare_digest(enrollment.secret_sha256, digest):
        raise NotFound("Unknown enrollment link; create one in your account.")
    if enrollment.used_at is not None:
        raise Gone("This enrollment link was already used; create a new one.")
    if enrollment.expires_at <= timezone.now():
        raise Gone(
            f"This enrollment link expired at {enrollment.expires_at:%Y-%m-%d %H:%M} UTC;"
            " create a new one."
        )
    return enrollment


@transaction.atomic
def enrollment_complete(
    *, secret: str, hostname: str, agent_url: str | None, port: int | None
) -> EnrolledNode:
    """Turn a used enrollment link into a node of its account. A link works once."""
    enrollment = enrollment_usable(secret=secret)
    check_quota(enrollment.account)
    if not Enrollment.objects.filter(pk=enrollment.pk, used_at__isnull=True).update(
        used_at=timezone.now()
    ):
        raise Gone("This enrollment link was already used; create a new one.")
    node_secret, node_secret_hash = new_secret()
    node = Node.objects.create(
        account=enrollment.account,
        requested_by=enrollment.created_by,
        name=_unique_node_name(enrollment.account, hostname),
        kind=Node.Kind.ENROLLED,
        agent_port=port,
        agent_url=agent_url or "",
        secret_sha256=node_secret_hash,
        **new_access_token(),
    )
    record_birth(node, f"enrolled from host {hostname!r} (figures are that machine's word)")
    Enrollment.objects.filter(pk=enrollment.pk).update(node=node)
    return EnrolledNode(node=node, secret=node_secret)
