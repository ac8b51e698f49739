from django.apps import AppConfig


class ApiConfig(AppConfig):
    """The REST API under /api/v1/ (customers), the agent endpoints and the enrollment links."""

    name = "api"
