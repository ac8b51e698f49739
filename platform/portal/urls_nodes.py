"""Routes of portal.views.nodes."""

urlpatterns: list = []
