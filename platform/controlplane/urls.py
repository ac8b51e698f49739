from django.contrib import admin
from django.urls import include, path

from controlplane.admin_throttle import throttled_login
from monitoring.views import metrics

urlpatterns = [
    path("admin/login/", throttled_login),  # matched before the admin's own login view
    path("admin/", admin.site.urls),
    path("metrics", metrics, name="metrics"),  # Prometheus, with the scrape token
    path("", include("api.urls")),
]

# JSON 404s under /api/ (a malformed id in a path), Django's page elsewhere.
handler404 = "api.views.not_found"
