"""The portal's pages, at the site root (controlplane.urls includes this last). Each concern's
routes live with its views: portal/urls_nodes.py, portal/urls_account.py."""

from django.urls import include, path

from portal.views import home

urlpatterns = [
    path("", home.home, name="portal-home"),
    path("", include("portal.urls_nodes")),
    path("", include("portal.urls_account")),
]
