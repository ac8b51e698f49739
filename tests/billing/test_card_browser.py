"""The card form (/billing/card, billing.pages) in a real browser: Debian's chromium, driven by
Playwright, against a live control plane (pytest-django's live_server, the real views and API)
whose Stripe is the session's localstripe, with localstripe's own Stripe.js. What is saved is
checked where it lands: in Stripe (the customer's default payment method) and in our API.

The browser fixtures are tests/browser.py's (given to this directory by tests/billing/conftest.py):
a browser per module, not pytest-playwright's session-wide one, which would leave every later
database test beside Playwright's running asyncio loop.
"""

import uuid

import pytest
import requests
from playwright.sync_api import expect

from billing.models import BillingCustomer
from controlplane.csp import content_security_policy
from tests.browser import sign_in
from tests.platform.conftest import account, make_customer

GOOD_CARD = "4242424242424242"
THREE_D_SECURE_CARD = "4000002500003155"
DECLINED_CARD = "4000000000000002"


@pytest.fixture
def shopper(visitor, live_server):
    """A signed-in customer of their own (localstripe's state lasts the whole session), on the
    card page with the form ready."""
    user = make_customer(f"card{uuid.uuid4().hex[:10]}")
    sign_in(visitor, user, live_server)
    visitor.goto("/billing/card")
    expect(visitor.get_by_role("button", name="Save card")).to_be_enabled()
    return user


def type_card(page, number: str) -> None:
    """Type into the card element's fields (localstripe's Stripe.js: plain inputs named by
    their placeholder) as a person would, key by key, over what was there."""
    form = page.locator("#card-element")
    for field, value in [
        ("number", number),
        ("exp_month", "12"),
        ("exp_year", "34"),
        ("cvc", "123"),
        ("postal_code", "10115"),
    ]:
        box = form.get_by_placeholder(field, exact=True)
        box.fill("")
        box.press_sequentially(value)


def status_of(page):
    return page.get_by_role("status")


def billing_api(page) -> dict:
    """GET /api/v1/billing with the browser's own session."""
    reply = page.request.get("/api/v1/billing")
    assert reply.status == 200, reply.text()
    return reply.json()


def stripe_default_card(stripe_api, user):
    """The last4 of the default payment method of the user's Stripe customer (None if none)."""
    customer = BillingCustomer.objects.get(account=account(user))
    stripe_customer = stripe_api.v1.customers.retrieve(customer.stripe_customer_id)
    method_id = stripe_customer["invoice_settings"]["default_payment_method"]
    if not method_id:
        return None
    return stripe_api.v1.payment_methods.retrieve(method_id)["card"]["last4"]


def assert_no_script_errors(console: list[str]) -> None:
    """No script failed and the page's policy refused nothing."""
    assert [t for t in console if "Content Security Policy" in t or "page error" in t] == []


def test_a_good_card_is_saved_in_stripe_and_shown(visitor, shopper, stripe_api, console):
    page = visitor
    expect(page.locator("#current-card")).to_have_text("No card yet.")

    type_card(page, GOOD_CARD)
    page.get_by_role("button", name="Save card").click()

    expect(status_of(page)).to_have_text("Card ending 4242 saved.")
    expect(page.locator("#current-card")).to_have_text("Visa •••• 4242, expires 12/2034")
    assert stripe_default_card(stripe_api, shopper) == "4242"
    card = billing_api(page)["card"]
    assert (card["brand"], card["last4"], card["exp"]) == ("visa", "4242", "12/2034")
    assert_no_script_errors(console)


def test_a_3d_secure_card_is_saved_after_the_authentication_dialog(
    visitor, shopper, stripe_api, console
):
    page = visitor

    type_card(page, THREE_D_SECURE_CARD)
    page.get_by_role("button", name="Save card").click()

    dialog_button = page.get_by_role("button", name="Complete authentication")
    dialog_button.wait_for()
    assert stripe_default_card(stripe_api, shopper) is None  # nothing before authentication
    dialog_button.click()

    expect(status_of(page)).to_have_text("Card ending 3155 saved.")
    assert stripe_default_card(stripe_api, shopper) == "3155"
    assert billing_api(page)["card"]["last4"] == "3155"
    assert_no_script_errors(console)


def test_a_failed_authentication_saves_nothing(visitor, shopper, stripe_api):
    page = visitor

    type_card(page, THREE_D_SECURE_CARD)
    page.get_by_role("button", name="Save card").click()
    page.get_by_role("button", name="Fail authentication").click()

    expect(status_of(page)).to_contain_text("authentication failed")
    assert stripe_default_card(stripe_api, shopper) is None
    assert billing_api(page)["card"] is None


def test_a_declined_card_says_so_and_saves_nothing(visitor, shopper, stripe_api):
    page = visitor

    type_card(page, DECLINED_CARD)
    page.get_by_role("button", name="Save card").click()

    expect(status_of(page)).to_have_text("Your card was declined.")
    assert stripe_default_card(stripe_api, shopper) is None
    assert billing_api(page)["card"] is None
    expect(page.locator("#current-card")).to_have_text("No card yet.")

    # The customer tries again with another card on the same page: a new SetupIntent.
    type_card(page, GOOD_CARD)
    page.get_by_role("button", name="Save card").click()
    expect(status_of(page)).to_have_text("Card ending 4242 saved.")
    assert stripe_default_card(stripe_api, shopper) == "4242"


def test_saving_without_a_card_asks_for_one(visitor, shopper):
    visitor.get_by_role("button", name="Save card").click()
    expect(status_of(visitor)).to_have_text(
        "Enter your card number, expiry date and security code first."
    )


def test_the_page_allows_scripts_from_itself_and_stripe_js_only(
    visitor, live_server, localstripe, console
):
    user = make_customer(f"card{uuid.uuid4().hex[:10]}")
    sign_in(visitor, user, live_server)
    response = visitor.goto("/billing/card")

    policy = response.headers["content-security-policy"]
    assert f"script-src 'self' {localstripe};" in policy
    assert "'unsafe-inline'" not in policy
    expect(visitor.get_by_role("button", name="Save card")).to_be_enabled()
    # The browser enforces it: an inline script put into the page does not run.
    visitor.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.injected = true;";
            document.body.appendChild(script);
        }"""
    )
    assert visitor.evaluate("() => window.injected === true") is False
    assert any("Content Security Policy" in text for text in console)


def test_a_signed_out_visitor_is_sent_to_sign_in(visitor, live_server):
    visitor.goto("/billing/card")

    assert visitor.url.startswith(f"{live_server.url}/accounts/login/?next=/billing/card")
    assert visitor.locator("#card-form").count() == 0
    # Nor can the page's API be used without a session.
    reply = requests.post(f"{live_server.url}/api/v1/billing/setup-intent", timeout=10)
    assert reply.status_code in (401, 403)


@pytest.mark.django_db
def test_without_stripe_keys_the_page_says_card_payments_are_off(client, stripe_settings):
    stripe_settings.STRIPE_SECRET_KEY = ""
    client.force_login(make_customer("offline"))

    page = client.get("/billing/card")

    assert page.status_code == 200
    assert b"Card payments are not set up" in page.content
    assert b"js.stripe.com" not in page.content  # no Stripe.js when billing is off


def test_the_policy_for_stripe_itself_follows_stripes_guide():
    policy = content_security_policy(
        stripe=True, stripe_js_url="https://js.stripe.com/v3/", stripe_api_base=""
    )

    directives = dict(part.split(" ", 1) for part in policy.split("; "))
    assert directives["script-src"] == "'self' https://js.stripe.com https://*.js.stripe.com"
    assert directives["connect-src"] == "'self' https://api.stripe.com"
    assert directives["frame-src"] == (
        "https://js.stripe.com https://*.js.stripe.com https://hooks.stripe.com"
    )
    assert directives["default-src"] == "'none'"
