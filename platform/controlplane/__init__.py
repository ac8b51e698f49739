"""The vTPU Cloud control plane's project package: settings, URLs, Celery app, WSGI."""

from controlplane.celery import app as celery_app

__all__ = ["celery_app"]
