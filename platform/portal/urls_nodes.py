"""Routes of portal.views.nodes (the node list is also the portal's home, portal/urls.py)."""

from django.urls import path

from portal.views import nodes

urlpatterns = [
    path("nodes/", nodes.node_list, name="portal-nodes"),
    path("nodes/rows/", nodes.node_rows, name="portal-node-rows"),
    path("nodes/new/", nodes.node_deploy, name="portal-node-deploy"),
    path("nodes/enroll/", nodes.node_enroll, name="portal-node-enroll"),
    path("nodes/<uuid:node_id>/", nodes.node_detail, name="portal-node"),
    path("nodes/<uuid:node_id>/status/", nodes.node_status, name="portal-node-status"),
    path("nodes/<uuid:node_id>/charts.json", nodes.node_chart_data, name="portal-node-charts"),
    path("nodes/<uuid:node_id>/jobs/<int:job_id>/log/", nodes.job_log, name="portal-job-log"),
    path("nodes/<uuid:node_id>/token/", nodes.node_token, name="portal-node-token"),
    path(
        "nodes/<uuid:node_id>/token/rotate/",
        nodes.node_token_rotate,
        name="portal-node-token-rotate",
    ),
    path("nodes/<uuid:node_id>/benchmark/", nodes.node_benchmark, name="portal-node-benchmark"),
    path("nodes/<uuid:node_id>/suspend/", nodes.node_suspend, name="portal-node-suspend"),
    path("nodes/<uuid:node_id>/resume/", nodes.node_resume, name="portal-node-resume"),
    path("nodes/<uuid:node_id>/payment/", nodes.node_payment_check, name="portal-node-payment"),
    path("nodes/<uuid:node_id>/delete/", nodes.node_delete, name="portal-node-delete"),
]
