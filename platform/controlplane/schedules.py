"""Every periodic task, defined here once (docs/architecture.md, "Queues").

They live in the database through django-celery-beat, so staff can change an interval or pause
an entry in the admin; `sync_schedules()` (run by `manage.py sync_schedules` at every start of the
run command, and when beat starts) creates missing entries, deletes ones no longer defined here,
and updates each entry's task, queue and expiry, but keeps the interval and on/off switch staff
chose. Every entry expires after its own interval: a beat that ran while no worker was free does
not pile up work.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.tasks import HOUSEKEEPING_QUEUE

PREFIX = "vtpu: "


@dataclass(frozen=True)
class Schedule:
    name: str
    task: str
    every_seconds: int
    queue: str = HOUSEKEEPING_QUEUE


SCHEDULES = (
    Schedule("poll node telemetry", "fleet.tasks.poll_nodes", 30),
    Schedule("mark silent nodes", "fleet.tasks.mark_silent_nodes", 15),
    Schedule("fail orphaned jobs", "fleet.tasks.fail_orphaned_jobs", 20),
    Schedule("requeue pending jobs", "fleet.tasks.requeue_pending_jobs", 15),
    Schedule("repair dead agents", "fleet.tasks.repair_dead_agents", 60),
    Schedule(
        "terminate vanished enrolled nodes", "fleet.tasks.terminate_vanished_enrolled_nodes", 300
    ),
    Schedule("prune history", "fleet.tasks.prune_history", 3600),
    Schedule("close the SLA month", "monitoring.tasks.close_sla_month", 3600),
    Schedule("schedule benchmarks", "monitoring.tasks.schedule_benchmarks", 60),
    Schedule("evaluate alerts", "monitoring.tasks.evaluate_alerts", 15),
    Schedule("deliver due alert messages", "monitoring.tasks.deliver_due_notifications", 30),
    Schedule("prune benchmark history", "monitoring.tasks.prune_history", 3600),
    Schedule("retry Stripe events", "billing.tasks.retry_stripe_events", 30),
    Schedule("reconcile billing with Stripe", "billing.tasks.reconcile", 300),
    Schedule("dunning", "billing.tasks.dunning", 60),
    Schedule("apply SLA credits", "billing.tasks.apply_sla_credits", 3600),
)


def sync_schedules() -> dict[str, int]:
    from django.db import transaction
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    counts = {"created": 0, "updated": 0, "deleted": 0}
    with transaction.atomic():
        names = set()
        for entry in SCHEDULES:
            name = PREFIX + entry.name
            names.add(name)
            task = PeriodicTask.objects.filter(name=name).first()
            if task is None:
                interval, _ = IntervalSchedule.objects.get_or_create(
                    every=entry.every_seconds, period=IntervalSchedule.SECONDS
                )
                PeriodicTask.objects.create(
                    name=name,
                    task=entry.task,
                    interval=interval,
                    queue=entry.queue,
                    expire_seconds=entry.every_seconds,
                )
                counts["created"] += 1
            elif (task.task, task.queue) != (entry.task, entry.queue) or not task.expire_seconds:
                task.task, task.queue = entry.task, entry.queue
                task.expire_seconds = task.expire_seconds or entry.every_seconds
                task.save()
                counts["updated"] += 1
        stale = PeriodicTask.objects.filter(name__startswith=PREFIX).exclude(name__in=names)
        counts["deleted"] = stale.count()
        stale.delete()
    return counts
