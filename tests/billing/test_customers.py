"""One Stripe customer per account (billing.services.customer_ensure), against a real local
Stripe server."""

import pytest
from django.db import connection

from billing.models import BillingCustomer
from billing.services import customer_ensure, customer_link_from_stripe
from billing.stripe_client import StripeNotConfigured
from tests.concurrency import at_once
from tests.platform.conftest import account


def stripe_customers(stripe_api, user) -> list:
    return stripe_api.v1.customers.list(params={"email": user.email}).data


@pytest.mark.django_db
def test_a_customer_is_created_once_and_reused(customer, stripe_api):
    first = customer_ensure(account=account(customer))
    second = customer_ensure(account=account(customer))
    assert first.stripe_customer_id and second.stripe_customer_id == first.stripe_customer_id
    (created,) = stripe_customers(stripe_api, customer)
    assert created.id == first.stripe_customer_id
    assert created.metadata["vtpu_account_id"] == str(account(customer).pk)


@pytest.mark.django_db
def test_billing_off_is_a_clear_refusal(customer, settings):
    settings.STRIPE_SECRET_KEY = ""
    with pytest.raises(StripeNotConfigured, match="STRIPE_SECRET_KEY"):
        customer_ensure(account=account(customer))


@pytest.mark.django_db
def test_a_customer_deleted_in_stripe_is_unlinked_and_a_new_one_made_when_needed(
    customer, stripe_api
):
    linked = customer_ensure(account=account(customer))
    stripe_api.v1.customers.delete(linked.stripe_customer_id)
    outcome = customer_link_from_stripe(stripe_customer_id=linked.stripe_customer_id)
    assert "unlinked" in outcome
    linked.refresh_from_db()
    assert linked.stripe_customer_id is None and linked.unlinked_at is not None
    again = customer_ensure(account=account(customer))
    assert again.stripe_customer_id not in (None, "") and again.pk == linked.pk


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_calls_make_one_customer(customer, stripe_api):
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises writers: concurrency is exercised on PostgreSQL (CI)")
    acct = account(customer)
    results, errors = at_once(lambda: customer_ensure(account=acct).stripe_customer_id, 3)
    assert not errors
    assert len(set(results)) == 1 and len(results) == 3
    assert [c.id for c in stripe_customers(stripe_api, customer)] == results[:1]
    assert BillingCustomer.objects.filter(account=account(customer)).count() == 1
