"""Deploying a node on a paid plan through the portal, against the session's local Stripe server
(tests/conftest.py's localstripe): no card, a good card, a card declined at payment, and a card
that wants 3-D Secure (confirmed as Stripe.js does, then re-read from Stripe by our server)."""

import re
import uuid

import pytest
import requests
from django.test import Client
from django.urls import reverse

from billing.models import NodeCharge
from fleet.models import Node
from tests.billing.conftest import set_default_card
from tests.conftest import give_card
from tests.platform.conftest import account, make_customer

pytestmark = pytest.mark.django_db


@pytest.fixture
def shopper(stripe_on, local_host):
    """A signed-in customer of their own name (localstripe's state lasts the whole session)."""
    user = make_customer(f"shop{uuid.uuid4().hex[:10]}")
    client = Client()
    client.force_login(user)
    client.user = user
    return client


def deploy(client, plan, name="web-1"):
    return client.post(reverse("portal-node-deploy"), {"name": name, "plan": str(plan.pk)})


def test_without_a_card_the_customer_is_sent_to_the_card_page(shopper, stripe_on):
    form = shopper.get(reverse("portal-node-deploy")).content.decode()
    assert 'id="card-needed"' in form
    assert 'href="/billing/card?next=/nodes/new/"' in form
    assert "USD 200.00 per node per month" in form

    refused = deploy(shopper, stripe_on)

    assert refused.status_code == 402
    assert "Add a card first" in refused.content.decode()
    assert not Node.objects.filter(account=account(shopper.user)).exists()


def test_a_paid_order_starts_provisioning(shopper, stripe_on, django_capture_on_commit_callbacks):
    give_card(account(shopper.user))
    assert 'id="card-needed"' not in shopper.get(reverse("portal-node-deploy")).content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        response = deploy(shopper, stripe_on)

    node = Node.objects.get(account=account(shopper.user))
    assert response.status_code == 302
    assert response["Location"] == reverse("portal-node", args=[node.pk])
    assert node.charge.state == NodeCharge.State.PAID
    assert node.jobs.count() == 1


def test_a_card_declined_at_payment_says_so_and_provisions_nothing(shopper, stripe_on):
    give_card(account(shopper.user))
    set_default_card(account(shopper.user), "4000000000000341")  # attaches; its charges fail

    response = deploy(shopper, stripe_on)

    assert response.status_code == 402
    html = response.content.decode()
    assert re.search(r'role="alert" id="form-error">Your card was declined\.', html)
    assert "Nothing was provisioned." in html
    node = Node.objects.get(account=account(shopper.user))
    assert not node.jobs.exists()
    # Another card pays for the held node: the way to the card page, and back to the node.
    assert f'href="/billing/card?next=/nodes/{node.pk}/">save another card</a>' in html


def test_the_card_page_links_back_to_this_sites_pages_only(shopper):
    back = shopper.get("/billing/card?next=/nodes/new/").content.decode()
    assert '<a href="/nodes/new/">Back to where you were</a>' in back

    for elsewhere in ("https://evil.example/", "//evil.example/nodes/"):
        page = shopper.get(f"/billing/card?next={elsewhere}").content.decode()
        assert "Back to where you were" not in page and "evil.example" not in page


def test_a_3d_secure_payment_is_confirmed_in_the_browser_then_read_back_from_stripe(
    shopper, stripe_on, localstripe, django_capture_on_commit_callbacks
):
    give_card(account(shopper.user))
    set_default_card(account(shopper.user), "4000002500003155")

    page = deploy(shopper, stripe_on)

    assert page.status_code == 200
    assert f"script-src 'self' {localstripe};" in page["Content-Security-Policy"]
    secret = re.search(r'data-client-secret="([^"]+)"', page.content.decode())[1]
    node = Node.objects.get(account=account(shopper.user))
    assert node.charge.state == NodeCharge.State.REQUIRES_ACTION and not node.jobs.exists()
    # What Stripe.js's confirmCardPayment does once the customer confirms.
    confirmed = requests.post(
        f"{localstripe}/v1/payment_intents/{secret.split('_secret_')[0]}/_authenticate",
        data={"client_secret": secret, "success": "true", "key": "pk_test_x"},
        timeout=10,
    )
    assert confirmed.status_code == 200, confirmed.text

    with django_capture_on_commit_callbacks(execute=True):
        back = shopper.post(reverse("portal-node-payment", args=[node.pk]))

    assert back.status_code == 302 and back["Location"] == reverse("portal-node", args=[node.pk])
    node.charge.refresh_from_db()
    assert node.charge.state == NodeCharge.State.PAID
    assert node.jobs.count() == 1
