"""Staff see plans, customers and every Stripe event in the admin; events are read-only and can
be processed again."""

import pytest

from billing.models import StripeEvent
from tests.billing.conftest import customer_event, signed
from tests.platform.conftest import make_customer

pytestmark = pytest.mark.django_db


def test_admin_pages_load_and_events_can_be_processed_again(
    client, django_capture_on_commit_callbacks
):
    staff = make_customer("sam", staff=True)
    with django_capture_on_commit_callbacks(execute=True):
        client.post(
            "/billing/stripe/webhook",
            signed(customer_event("cus_gone"))[0],
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=signed(customer_event("cus_other"))[1],
        )  # refused: the signature is another body's
        body, header = signed(customer_event("cus_gone"))
        client.post(
            "/billing/stripe/webhook",
            body,
            content_type="application/json",
            HTTP_STRIPE_SIGNATURE=header,
        )
    event = StripeEvent.objects.get(state="processed")
    client.force_login(staff)
    for page in ["billing/plan/", "billing/billingcustomer/", "billing/stripeevent/",
                 f"billing/stripeevent/{event.pk}/change/", "billing/subscription/",
                 "billing/invoice/", "billing/nodecharge/", "billing/slacreditapplied/",
                 "billing/reconciliationissue/"]:  # fmt: skip
        assert client.get(f"/admin/{page}").status_code == 200, page
    assert client.get("/admin/billing/stripeevent/add/").status_code == 403
    assert client.get("/admin/billing/invoice/add/").status_code == 403
    with django_capture_on_commit_callbacks(execute=True):
        reply = client.post(
            "/admin/billing/stripeevent/",
            {
                "action": "process_again",
                "_selected_action": list(StripeEvent.objects.values_list("pk", flat=True)),
            },
        )
    assert reply.status_code == 302
    event.refresh_from_db()
    assert event.state == "processed" and event.attempts == 2
    assert StripeEvent.objects.get(state="rejected").attempts == 0


def test_staff_mirror_a_plan_to_stripe_from_the_admin(client, stripe_api):
    from billing.models import Plan

    client.force_login(make_customer("sam", staff=True))
    plan = Plan.objects.create(name="half price", amount_cents=10000)
    reply = client.post(
        "/admin/billing/plan/", {"action": "mirror_to_stripe", "_selected_action": [plan.pk]}
    )
    assert reply.status_code == 302
    plan.refresh_from_db()
    assert stripe_api.v1.plans.retrieve(plan.stripe_plan_id).amount == 10000
