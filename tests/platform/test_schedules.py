"""Periodic tasks: defined once in code, kept in the database (django-celery-beat), synced on
start without undoing what staff changed, each expiring after its own interval."""

import pytest
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from controlplane import celery as celery_app
from controlplane.schedules import PREFIX, SCHEDULES, sync_schedules

pytestmark = pytest.mark.django_db


def test_every_schedule_is_created_once_with_its_queue_and_expiry():
    celery_app.app.loader.import_default_modules()  # what a worker does when it starts
    assert sync_schedules()["created"] == len(SCHEDULES)
    assert sync_schedules() == {"created": 0, "updated": 0, "deleted": 0}
    for entry in SCHEDULES:
        task = PeriodicTask.objects.get(name=PREFIX + entry.name)
        assert task.task == entry.task and task.queue == "housekeeping"
        assert task.interval.every == entry.every_seconds
        assert task.expire_seconds == entry.every_seconds  # a missed run does not pile up
        assert entry.task in celery_app.app.tasks  # names a real task


def test_a_sync_keeps_what_staff_changed_and_drops_what_code_no_longer_defines():
    sync_schedules()
    first = PeriodicTask.objects.get(name=PREFIX + SCHEDULES[0].name)
    slower, _ = IntervalSchedule.objects.get_or_create(every=300, period="seconds")
    first.interval, first.enabled = slower, False
    first.save()
    PeriodicTask.objects.create(
        name=PREFIX + "gone", task="fleet.tasks.old", interval=slower, queue="housekeeping"
    )
    counts = sync_schedules()
    assert counts["deleted"] == 1 and not PeriodicTask.objects.filter(name=PREFIX + "gone").exists()
    first.refresh_from_db()
    assert first.interval.every == 300 and first.enabled is False


def test_jobs_and_sweeps_go_to_separate_queues(settings):
    routes = settings.CELERY_TASK_ROUTES
    assert routes["fleet.tasks.run_job"]["queue"] == "provisioning"
    assert settings.CELERY_TASK_DEFAULT_QUEUE == "housekeeping"
    assert settings.CELERY_BEAT_SCHEDULER.startswith("django_celery_beat")
