"""Included under /staff/ (controlplane.urls): the staff dashboard, staff only."""

from django.urls import path

from dashboards import views

urlpatterns = [
    path("", views.dashboard, name="staff-dashboard"),
    path("data.json", views.data, name="staff-data"),
    path("assumptions", views.assumptions, name="staff-assumptions"),
]
