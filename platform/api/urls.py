"""Included at the site root: full paths here (/api/v1/..., /enroll/...)."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView

from api import views

N = "api/v1/nodes/<uuid:node_id>"
urlpatterns = [
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/v1/nodes", views.NodeListView.as_view(), name="node-list"),
    path(N, views.NodeDetailView.as_view(), name="node-detail"),
    path(f"{N}/retry", views.NodeRetryView.as_view(), name="node-retry"),
    path(f"{N}/suspend", views.NodeSuspendView.as_view(), name="node-suspend"),
    path(f"{N}/resume", views.NodeResumeView.as_view(), name="node-resume"),
    path(f"{N}/jobs", views.NodeJobsView.as_view(), name="node-jobs"),
    path(f"{N}/transitions", views.NodeTransitionsView.as_view(), name="node-transitions"),
    path(f"{N}/actions", views.NodeActionsView.as_view(), name="node-actions"),
    path(f"{N}/telemetry", views.NodeTelemetryView.as_view(), name="node-telemetry"),
    path(f"{N}/models", views.NodeModelLoadView.as_view(), name="node-models"),
    path(f"{N}/credentials", views.NodeCredentialsView.as_view(), name="node-credentials"),
    path(
        f"{N}/credentials/rotate",
        views.NodeCredentialsRotateView.as_view(),
        name="node-credentials-rotate",
    ),
    path(f"{N}/uptime", views.NodeUptimeView.as_view(), name="node-uptime"),
    path(f"{N}/flips", views.NodeFlipsView.as_view(), name="node-flips"),
    path(f"{N}/maintenance", views.NodeMaintenanceView.as_view(), name="node-maintenance"),
    path(f"{N}/benchmarks", views.NodeBenchmarksView.as_view(), name="node-benchmarks"),
    path(
        f"{N}/benchmarks/stats",
        views.NodeBenchmarkStatsView.as_view(),
        name="node-benchmark-stats",
    ),
    path("api/v1/sla", views.SlaReportView.as_view(), name="sla-report"),
    path("api/v1/alerts", views.AlertListView.as_view(), name="alert-list"),
    path("api/v1/alerts/<int:alert_id>", views.AlertDetailView.as_view(), name="alert-detail"),
    path("api/v1/alert-channels", views.AlertChannelListView.as_view(), name="channel-list"),
    path(
        "api/v1/alert-channels/<int:channel_id>",
        views.AlertChannelDetailView.as_view(),
        name="channel-detail",
    ),
    path("api/v1/jobs/<int:job_id>", views.JobDetailView.as_view(), name="job-detail"),
    path("api/v1/jobs/<int:job_id>/events", views.JobEventsView.as_view(), name="job-events"),
    path("api/v1/jobs/<int:job_id>/cancel", views.JobCancelView.as_view(), name="job-cancel"),
    path("api/v1/tokens", views.TokenListView.as_view(), name="token-list"),
    path("api/v1/tokens/<int:token_id>", views.TokenDetailView.as_view(), name="token-detail"),
    path("api/v1/billing", views.BillingView.as_view(), name="billing"),
    path("api/v1/billing/plans", views.PlanListView.as_view(), name="billing-plans"),
    path("api/v1/billing/setup-intent", views.SetupIntentView.as_view(), name="billing-setup"),
    path(
        "api/v1/billing/payment-method",
        views.PaymentMethodView.as_view(),
        name="billing-payment-method",
    ),
    path("api/v1/billing/invoices", views.InvoiceListView.as_view(), name="billing-invoices"),
    path(
        "api/v1/billing/invoices/<int:invoice_id>/pay",
        views.InvoicePayView.as_view(),
        name="billing-invoice-pay",
    ),
    path("api/v1/billing/cancel", views.BillingCancelView.as_view(), name="billing-cancel"),
    path(
        "api/v1/billing/reconciliation",
        views.ReconciliationIssueListView.as_view(),
        name="billing-reconciliation",
    ),
    path("api/v1/enrollments", views.EnrollmentListView.as_view(), name="enrollment-list"),
    path("api/v1/enroll", views.EnrollView.as_view(), name="enroll"),
    path("api/v1/agent/heartbeat", views.HeartbeatView.as_view(), name="agent-heartbeat"),
    path("enroll/<str:secret>/install.sh", views.install_script, name="enroll-install"),
    path("enroll/<str:secret>/<str:filename>", views.wheel_download, name="enroll-wheel"),
    path("api/v1/economics", views.EconomicsView.as_view(), name="economics"),
    path(
        "api/v1/economics/assumptions",
        views.EconomicAssumptionsView.as_view(),
        name="economics-assumptions",
    ),
]
