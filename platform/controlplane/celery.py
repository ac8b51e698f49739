"""The Celery app: workers and beat for all background work (no cron, no threads in web).

Periodic schedules are defined here, in one place.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

app.conf.beat_schedule = {
    "poll-node-telemetry": {"task": "fleet.tasks.poll_nodes", "schedule": 30.0},
    "mark-silent-nodes": {"task": "fleet.tasks.mark_silent_nodes", "schedule": 30.0},
    "fail-orphaned-jobs": {"task": "fleet.tasks.fail_orphaned_jobs", "schedule": 60.0},
}
