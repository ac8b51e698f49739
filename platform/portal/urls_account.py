"""Routes of portal.views.account."""

urlpatterns: list = []
