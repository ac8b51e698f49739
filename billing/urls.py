"""Included under /billing/ (controlplane.urls)."""

from django.urls import path

from billing import pages, views

urlpatterns = [
    path("stripe/webhook", views.stripe_webhook, name="billing-stripe-webhook"),
    path("card", pages.card, name="billing-card"),  # the card form (a signed-in customer)
]
