"""The staff dashboard in a real browser (Debian's chromium through Playwright, tests/browser.py)
against a live control plane: every chart draws from the page's report under the strict policy
(no script or style refused), axe-core finds no serious or critical violation, and the page has
no horizontal scroll at phone width; a bad assumption is announced with its field. With
SCREENSHOTS_DIR set, the page is saved there as staff.png."""

import os
import re
import uuid
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.billing.test_economics import build_fleet
from tests.browser import PHONE, axe_violations, horizontal_overflow, script_errors, sign_in
from tests.platform.conftest import make_customer

pytestmark = pytest.mark.django_db(transaction=True)
CHARTS = ("mrr", "paying", "burn", "cost", "break-even", "roi")


@pytest.fixture
def staff_page(visitor, live_server):
    people = {name: make_customer(f"{name}{uuid.uuid4().hex[:6]}") for name in
              ("alice", "bob", "carol", "dave")}  # fmt: skip
    build_fleet(people, timezone.now())
    sign_in(visitor, make_customer(f"ops{uuid.uuid4().hex[:6]}", staff=True), live_server)
    return visitor


def test_the_charts_draw_and_the_page_is_accessible(staff_page, console):
    page = staff_page
    page.goto("/staff/")
    for name in CHARTS:
        chart = page.locator(f"#chart-{name}")
        expect(chart).to_have_attribute("data-drawn", "chart")
        expect(chart.locator("canvas")).to_have_count(1)
        assert chart.locator("canvas").bounding_box()["width"] >= 280
    # The break-even chart has a line per host and the upfront cost's.
    labels = page.locator("#chart-break-even .u-legend .u-label").all_inner_texts()
    assert "h1 (USD net)" in labels and "Upfront cost (USD)" in labels
    assert script_errors(console) == []
    assert axe_violations(page) == []
    if os.environ.get("SCREENSHOTS_DIR"):  # what staff see, for people to look at
        page.screenshot(path=Path(os.environ["SCREENSHOTS_DIR"]) / "staff.png", full_page=True)

    page.set_viewport_size(PHONE)
    page.reload()
    expect(page.locator("#chart-roi")).to_have_attribute("data-drawn", "chart")
    assert horizontal_overflow(page) == 0
    assert axe_violations(page) == []


def test_an_empty_fleet_says_why_instead_of_a_chart(visitor, live_server, console):
    sign_in(visitor, make_customer(f"ops{uuid.uuid4().hex[:6]}", staff=True), live_server)
    visitor.goto("/staff/")
    cost = visitor.locator("#chart-cost")
    expect(cost).to_have_attribute("data-drawn", "empty")
    expect(cost).to_contain_text("fewer than two telemetry samples")
    expect(visitor.locator("#chart-mrr")).to_have_attribute("data-drawn", "chart")
    assert script_errors(console) == []
    assert axe_violations(visitor) == []

    # A bad assumption, typed and saved: its message is beside it, announced with the field.
    field = visitor.get_by_label("Hardware amortised over (months)")
    field.fill("0")
    visitor.get_by_role("button", name="Save assumptions").click()
    field = visitor.get_by_label("Hardware amortised over (months)")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_accessible_description(re.compile("greater than or equal to 1"))
    assert axe_violations(visitor) == []
