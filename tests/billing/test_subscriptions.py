"""Money and nodes in agreement, against a real local Stripe server with the real `stripe` client:
a node on a paid plan is provisioned only once its invoice is paid (a good card, a 3-D Secure
card, a declined card); the subscription grows and shrinks with the nodes; cancelling ends the
nodes at period end; invoices and payments are visible to their account only."""

import time

import pytest
import requests
from django.urls import reverse

from billing import subscriptions
from billing.models import BillingCustomer, Invoice, NodeCharge, Plan, Subscription
from fleet.models import Node, ProvisioningJob
from tests.billing.conftest import make_ready, order, set_default_card
from tests.conftest import STRIPE_PUBLISHABLE_KEY, give_card
from tests.platform.conftest import account, api_client_for

pytestmark = pytest.mark.django_db
RUN_JOB = "fleet.tasks.run_job"
WEBHOOK = "/billing/stripe/webhook"


@pytest.fixture
def api(customer):
    return api_client_for(customer)


def stripe_subscription(stripe_api, customer, plan):
    sub = Subscription.objects.get(account=account(customer), plan=plan, ended_at=None)
    return sub, stripe_api.v1.subscriptions.retrieve(sub.stripe_subscription_id)


def jobs_queued(tasks) -> list:
    return [args[0] for name, args in tasks if name == RUN_JOB]


def test_an_order_without_a_card_is_refused_and_nothing_is_made(api, local_host, plan):
    reply = order(api, "first")
    assert reply.status_code == 402, reply.content
    assert "Add a card first" in reply.json()["detail"]
    assert "200.00 USD per node per month" in reply.json()["detail"]
    assert not Node.objects.exists()


def test_a_declined_card_is_never_saved(customer, local_host, plan):
    import stripe

    with pytest.raises(stripe.CardError, match="declined"):
        give_card(account(customer), "4000000000000002")
    assert not BillingCustomer.objects.get(account=account(customer)).payment_method_id
    assert order(api_client_for(customer), "first").status_code == 402


def test_good_card_subscription_invoice_paid_node_provisioned(
    customer, api, local_host, plan, stripe_api, tasks, committed
):
    give_card(account(customer))
    reply = committed(order, api, "first")
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["plan"] == plan.pk and body["payment"]["state"] == "paid"
    assert body["client_secret"] is None
    node = Node.objects.get(pk=body["id"])
    job = ProvisioningJob.objects.get(node=node)
    assert jobs_queued(tasks) == [job.pk]
    sub, current = stripe_subscription(stripe_api, customer, plan)
    assert (current["status"], current["quantity"]) == ("active", 1)
    (invoice,) = Invoice.objects.filter(account=account(customer))
    assert (invoice.status, invoice.amount_paid_cents) == ("paid", 20000)
    assert body["payment"]["invoice"] == invoice.pk

    # A second node grows the subscription and is charged on its own invoice, paid at once.
    reply = committed(order, api, "second")
    assert reply.status_code == 201 and reply.json()["payment"]["state"] == "paid"
    sub, current = stripe_subscription(stripe_api, customer, plan)
    assert current["quantity"] == 2 and sub.quantity == 2
    assert len(jobs_queued(tasks)) == 2
    assert Invoice.objects.filter(account=account(customer), status="paid").count() == 2

    # The customer sees their invoices with their payments.
    listed = api.get(reverse("billing-invoices")).json()["results"]
    assert [i["status"] for i in listed] == ["paid", "paid"]
    assert all(i["payment"]["status"] == "succeeded" for i in listed)
    overview = api.get(reverse("billing")).json()
    assert overview["card"]["last4"] == "4242" and overview["standing"] == "good"
    assert overview["subscriptions"][0]["quantity"] == 2
    assert overview["publishable_key"] == STRIPE_PUBLISHABLE_KEY


def test_removing_nodes_shrinks_then_cancels_the_subscription(
    customer, api, local_host, plan, stripe_api, tasks, committed
):
    give_card(account(customer))
    first, second = (order(api, n).json()["id"] for n in ("first", "second"))
    for node in Node.objects.all():  # provisioned: a delete runs the deprovisioning job
        make_ready(node)
    url = reverse("node-detail", kwargs={"node_id": first})
    assert committed(api.delete, url).status_code == 202
    sub, current = stripe_subscription(stripe_api, customer, plan)
    assert current["quantity"] == 1
    url = reverse("node-detail", kwargs={"node_id": second})
    assert committed(api.delete, url).status_code == 202
    sub.refresh_from_db()
    assert sub.status == "canceled"
    assert stripe_api.v1.subscriptions.retrieve(sub.stripe_subscription_id)["status"] == "canceled"


def test_a_card_declined_at_payment_provisions_nothing_until_paid(
    customer, api, local_host, plan, tasks, committed
):
    give_card(account(customer))
    set_default_card(account(customer), "4000000000000341")  # attaches; its charges fail
    reply = order(api, "first")
    assert reply.status_code == 402, reply.content
    assert reply.json()["detail"].startswith("Your card was declined.")
    node = Node.objects.get(pk=reply.json()["node"]["id"])
    assert node.state == "requested" and not node.jobs.exists()
    assert node.charge.state == NodeCharge.State.DECLINED
    assert jobs_queued(tasks) == []

    # A new card pays what is owed at once, and the node is provisioned.
    committed(give_card, account(customer))
    node.charge.refresh_from_db()
    assert node.charge.state == NodeCharge.State.PAID
    assert jobs_queued(tasks) == [node.jobs.get().pk]
    assert not Invoice.objects.filter(account=account(customer), status="open").exists()


@pytest.mark.django_db(transaction=True)
def test_a_3d_secure_payment_provisions_once_confirmed(
    customer, local_host, plan, stripe_api, tasks, live_server, register_webhook, localstripe
):
    """The bank wants 3-D Secure: the node waits; the browser confirms (Stripe.js
    confirmCardPayment, here its request to the local server); Stripe's real signed webhooks
    then release the node."""
    register_webhook(
        live_server.url + WEBHOOK, ["payment_intent.succeeded", "invoice.payment_succeeded"]
    )
    give_card(account(customer))
    set_default_card(account(customer), "4000002500003155")
    reply = order(api_client_for(customer), "first")
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["payment"]["state"] == "requires_action"
    assert "3-D Secure" in body["payment"]["message"]
    node = Node.objects.get(pk=body["id"])
    assert not node.jobs.exists()
    intent_id = body["client_secret"].split("_secret_")[0]
    confirmed = requests.post(
        f"{localstripe}/v1/payment_intents/{intent_id}/_authenticate",
        data={"client_secret": body["client_secret"], "success": "true", "key": "pk_test_x"},
        timeout=10,
    )
    assert confirmed.status_code == 200, confirmed.text
    deadline = time.monotonic() + 20
    while not node.jobs.exists():
        assert time.monotonic() < deadline, "the webhooks never released the node"
        time.sleep(0.2)
    node.charge.refresh_from_db()
    assert node.charge.state == NodeCharge.State.PAID
    time.sleep(1.5)  # let the other event land before teardown flushes the database


def test_cancelling_deprovisions_at_period_end(
    customer, api, local_host, plan, stripe_api, tasks, settings
):
    give_card(account(customer))
    node_id = order(api, "first").json()["id"]
    node = Node.objects.get(pk=node_id)
    make_ready(node)
    reply = api.post(reverse("billing-cancel"))
    assert reply.status_code == 202 and reply.json()["cancel_requested_at"]
    sub, current = stripe_subscription(stripe_api, customer, plan)
    assert str(current["cancel_at_period_end"]).lower() == "true"
    # New nodes are refused while the cancellation stands; the running one keeps running.
    refused = order(api, "second")
    assert refused.status_code == 409 and "cancelled" in refused.json()["detail"]
    node.refresh_from_db()
    assert node.state == "ready"

    # The period ends (the local server has no clock: the sweep does what Stripe would).
    assert subscriptions.subscriptions_period_ended(now=sub.current_period_end) == 1
    node.refresh_from_db()
    assert node.state == "deprovisioning"
    assert "cancelled" in node.transitions.last().cause
    sub.refresh_from_db()
    assert sub.status == "canceled"


def test_a_cancellation_can_be_taken_back(customer, api, local_host, plan, stripe_api, tasks):
    give_card(account(customer))
    order(api, "first")
    api.post(reverse("billing-cancel"))
    reply = api.delete(reverse("billing-cancel"))
    assert reply.status_code == 200 and reply.json()["cancel_requested_at"] is None
    sub, current = stripe_subscription(stripe_api, customer, plan)
    assert str(current["cancel_at_period_end"]).lower() == "false"
    assert api.delete(reverse("billing-cancel")).status_code == 409


def test_an_unknown_plan_is_404_and_a_free_plan_needs_no_card(
    api, local_host, plan, tasks, committed
):
    assert order(api, "first", plan=999999).status_code == 404
    free = Plan.objects.create(name="free trial", amount_cents=0)
    reply = committed(order, api, "first", plan=free.pk)
    assert reply.status_code == 201 and reply.json()["payment"]["state"] == "free"
    assert jobs_queued(tasks)


def test_paying_an_invoice_of_another_account_is_404(customer, api, local_host, plan, tasks):
    from tests.platform.conftest import make_customer

    give_card(account(customer))
    order(api, "first")
    invoice = Invoice.objects.get(account=account(customer))
    other = api_client_for(make_customer("someone-else"))
    url = reverse("billing-invoice-pay", kwargs={"invoice_id": invoice.pk})
    assert other.post(url).status_code == 404
    paid_again = api.post(url)
    assert paid_again.status_code == 409 and "paid, not open" in paid_again.json()["detail"]


def test_an_enrolled_node_is_billed_by_its_own_plan(
    customer, api, plan, stripe_api, tasks, committed
):

    own = Plan.objects.create(name="own machine", amount_cents=5000, node_kind="enrolled")
    refused = api.post(reverse("enrollment-list"))
    assert refused.status_code == 402 and "own machine" in refused.json()["detail"]
    give_card(account(customer))
    link = api.post(reverse("enrollment-list")).json()
    secret = link["url"].split("/enroll/")[1].split("/")[0]
    enrolled = committed(
        api.post, reverse("enroll"), {"secret": secret, "hostname": "my-box"}, format="json"
    ).json()
    node = Node.objects.get(pk=enrolled["node_id"])
    assert node.plan == own
    sub, current = stripe_subscription(stripe_api, customer, own)
    assert (current["quantity"], int(current["plan"]["amount"])) == (1, 5000)
