from django.contrib import admin
from django.contrib.auth.views import LogoutView
from django.urls import include, path

from controlplane.admin_throttle import throttled_customer_login, throttled_login
from monitoring.views import metrics, prometheus_targets_view

urlpatterns = [
    path("admin/login/", throttled_login),  # matched before the admin's own login view
    path("admin/", admin.site.urls),
    path("accounts/login/", throttled_customer_login, name="login"),
    path("accounts/logout/", LogoutView.as_view(next_page="login"), name="logout"),
    path("metrics", metrics, name="metrics"),  # Prometheus, with the scrape token
    # Prometheus' http_sd of the node agents, with the same token (not in the OpenAPI schema)
    path("api/v1/prometheus/targets", prometheus_targets_view, name="prometheus-targets"),
    path("billing/", include("billing.urls")),  # Stripe's webhook; the card form (a session)
    path("staff/", include("dashboards.urls")),  # the staff dashboard (staff only)
    path("", include("api.urls")),
    path("", include("portal.urls")),  # the customer portal (pages at /)
]

# JSON 404s under /api/ (a malformed id in a path), Django's page elsewhere.
handler404 = "api.views.not_found"
