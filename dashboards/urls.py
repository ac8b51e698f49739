"""Included under /staff/ (controlplane.urls): the staff dashboard, staff only."""

urlpatterns: list = []
