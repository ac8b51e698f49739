import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
application = get_wsgi_application()


def _warm_openapi_schema() -> None:
    """drf-spectacular loads its extensions on the first schema request, and not thread-safely:
    two first requests in gunicorn's threads race and one gets a 500. Load them here, once."""
    from drf_spectacular.generators import SchemaGenerator

    SchemaGenerator().get_schema(request=None, public=True)


_warm_openapi_schema()
