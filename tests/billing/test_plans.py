"""Plans mirrored to Stripe (billing.services.plan_sync) against a real local Stripe server."""

import io

import pytest
from django.core.management import call_command

from billing.models import Plan
from billing.services import plan_default_ensure, plan_sync

pytestmark = pytest.mark.django_db


def test_the_default_plan_exists_after_migrating():
    plan = Plan.objects.get(name="vTPU node")
    assert (plan.amount_cents, plan.currency, plan.interval) == (20000, "usd", "month")
    assert plan.node_kind == "provisioned" and plan.sla_target == 0.999
    assert plan.sla_credit_percent == 10 and plan.active
    assert plan_default_ensure() == plan  # made once


def test_plan_sync_creates_the_product_and_plan_in_stripe_once(stripe_api):
    plan = Plan.objects.create(name="own machine", amount_cents=5000, node_kind="enrolled")
    plan = plan_sync(plan=plan)
    product = stripe_api.v1.products.retrieve(plan.stripe_product_id)
    stripe_plan = stripe_api.v1.plans.retrieve(plan.stripe_plan_id)
    assert product.name == "own machine"
    assert product.metadata["vtpu_plan_id"] == str(plan.pk)
    assert (stripe_plan.amount, stripe_plan.currency, stripe_plan.interval) == (
        5000,
        "usd",
        "month",
    )
    assert stripe_plan.product == plan.stripe_product_id
    again = plan_sync(plan=plan)
    assert (again.stripe_product_id, again.stripe_plan_id) == (
        plan.stripe_product_id,
        plan.stripe_plan_id,
    )
    assert len(stripe_api.v1.plans.list(params={"product": plan.stripe_product_id}).data) == 1


def test_a_price_change_makes_a_new_stripe_plan_and_retires_the_old_one(stripe_api):
    plan = plan_sync(plan=Plan.objects.create(name="ranch node", amount_cents=20000))
    old_id = plan.stripe_plan_id
    Plan.objects.filter(pk=plan.pk).update(amount_cents=15000, name="ranch node (reduced)")
    plan = plan_sync(plan=plan)
    assert plan.stripe_plan_id != old_id
    assert stripe_api.v1.plans.retrieve(plan.stripe_plan_id).amount == 15000
    assert str(stripe_api.v1.plans.retrieve(old_id).active).lower() == "false"
    assert stripe_api.v1.products.retrieve(plan.stripe_product_id).name == "ranch node (reduced)"


def test_sync_plans_mirrors_every_plan_or_says_stripe_is_off(settings, stripe_api):
    out = io.StringIO()
    call_command("sync_plans", stdout=out)
    plan = Plan.objects.get(name="vTPU node")
    assert plan.stripe_plan_id and plan.stripe_plan_id in out.getvalue()
    assert stripe_api.v1.plans.retrieve(plan.stripe_plan_id).amount == 20000
    settings.STRIPE_SECRET_KEY = ""
    out = io.StringIO()
    call_command("sync_plans", stdout=out)
    assert "not configured" in out.getvalue()


def test_a_plan_refuses_an_sla_target_outside_0_to_1_and_a_credit_over_100_percent():
    from django.core.exceptions import ValidationError

    for fields in ({"sla_target": 1.5}, {"sla_target": 0}, {"sla_credit_percent": 101}):
        with pytest.raises(ValidationError):
            Plan(name="bad", amount_cents=100, **fields).full_clean()
