from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Customers (Django users) and their API tokens."""

    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from accounts import schema  # noqa: F401 - registers the OpenAPI auth extension
