"""The Celery app: workers and beat for all background work (no cron, no threads in web).

Periodic schedules are defined in controlplane.schedules and kept in the database by
django-celery-beat (beat runs with its DatabaseScheduler); they are synced when beat starts.
"""

import os

from celery import Celery
from celery.signals import beat_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@beat_init.connect
def _sync_schedules(**_kwargs) -> None:
    from controlplane.schedules import sync_schedules

    sync_schedules()
