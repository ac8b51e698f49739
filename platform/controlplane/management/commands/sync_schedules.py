"""Write the periodic tasks defined in controlplane.schedules into the database."""

from django.core.management.base import BaseCommand

from controlplane.schedules import sync_schedules


class Command(BaseCommand):
    help = "Create, update and delete django-celery-beat entries to match controlplane.schedules."

    def handle(self, *args, **options) -> None:
        counts = sync_schedules()
        self.stdout.write(", ".join(f"{k} {v}" for k, v in counts.items()))
