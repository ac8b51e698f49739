"""What monitoring stores beyond the fleet's own record. Up/down flips are not stored again: they
are the node's transitions (fleet.models.NodeTransition) read through monitoring.uptime
(docs/architecture.md, "Uptime and SLA")."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class MaintenanceWindow(models.Model):
    """Planned work, entered by staff: downtime inside it does not count. For one node, every
    node of one host, or (neither set) the whole fleet; customers see theirs in advance."""

    node = models.ForeignKey(
        "fleet.Node", on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    host = models.ForeignKey(
        "fleet.Host", on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=500, help_text="Shown to the customers it affects.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["starts_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")), name="maintenance_ends_after_start"
            ),
            models.CheckConstraint(
                condition=Q(node__isnull=True) | Q(host__isnull=True),
                name="maintenance_node_or_host_or_fleet",
            ),
        ]

    def __str__(self) -> str:
        scope = self.node or self.host or "whole fleet"
        return f"{scope}: {self.starts_at:%Y-%m-%d %H:%M}–{self.ends_at:%H:%M} {self.reason}"


class SlaCredit(models.Model):
    """A month that closed below the node's SLA: recorded once per node and month (billing turns
    it into money)."""

    node = models.ForeignKey("fleet.Node", on_delete=models.PROTECT, related_name="sla_credits")
    account = models.ForeignKey(
        "accounts.Account", on_delete=models.PROTECT, related_name="sla_credits"
    )
    month = models.DateField(help_text="The first day of the month (UTC).")
    uptime_ratio = models.FloatField()
    sla_target = models.FloatField()
    down_seconds = models.PositiveIntegerField()
    credit_percent = models.PositiveIntegerField(
        help_text="Share of the node's monthly fee owed back (SLA_CREDIT_SCHEDULE)."
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-month", "node"]
        constraints = [
            models.UniqueConstraint(fields=["node", "month"], name="sla_credit_once_per_month")
        ]

    def __str__(self) -> str:
        return f"{self.node} {self.month:%Y-%m}: {self.uptime_ratio:.5f} → {self.credit_percent} %"


class SlaMonthClosed(models.Model):
    """A month whose SLA was closed: later runs of the hourly task skip it at once."""

    month = models.DateField(unique=True)
    credits = models.PositiveIntegerField()
    closed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-month"]
