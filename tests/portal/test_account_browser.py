"""The account pages in a real browser (Debian's chromium through Playwright, tests/browser.py)
against a live control plane: signing up lands on the portal's home; a password reset mail's
link sets a new password that signs in; a member of another account gets 404 on this account's
pages, and a customer cannot reach /staff/; secrets are shown once with a working copy button;
an owner's invitation mail lets the invitee join; axe-core finds no serious or critical
violation on the sign-up, team, invitation, channels, tokens, billing and docs pages, which have
no horizontal scroll at phone width (375 px)."""

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from billing.models import Invoice
from monitoring.models import AlertChannel
from tests.browser import PHONE, axe_violations, horizontal_overflow, script_errors, sign_in
from tests.platform.conftest import account, make_customer
from tests.portal.account_fixtures import link_in, path_of

pytestmark = pytest.mark.django_db(transaction=True)


def check_accessible(page) -> None:
    assert axe_violations(page) == []
    page.set_viewport_size(PHONE)
    assert horizontal_overflow(page) == 0
    assert axe_violations(page) == []  # the phone layout too (contrast, target sizes...)


def test_signing_up_in_the_browser_lands_on_home(visitor, live_server, console):
    page = visitor
    page.goto("/accounts/login/")
    page.get_by_role("link", name="Create an account").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Create your vTPU Cloud account")
    check_accessible(page)

    page.get_by_label("Account name").fill("Hana Labs")
    page.get_by_label("User name").fill("hana")
    page.get_by_label("E-mail address").fill("hana@example.com")
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create account").click()
    # The refusal is next to the password, and tied to its input for screen readers.
    password = page.get_by_label("Password")
    expect(password).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#id_password_error")).to_contain_text("too short")
    assert axe_violations(page) == []

    password.fill("hanas long passphrase")
    page.get_by_role("button", name="Create account").click()

    page.wait_for_url(f"{live_server.url}/")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    assert script_errors(console) == []


def test_a_password_reset_link_from_the_mail_works(visitor, live_server, mailoutbox):
    make_customer("ivy")
    page = visitor
    page.goto("/accounts/login/")
    page.get_by_role("link", name="Forgot your password?").click()
    page.get_by_label("Email").fill("ivy@example.com")
    page.get_by_role("button", name="Send the link").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your mail")
    (mail,) = mailoutbox
    link = link_in(mail)
    assert link.startswith(live_server.url)

    page.goto(path_of(link))
    page.get_by_label("New password:", exact=True).fill("ivys new passphrase")
    page.get_by_label("New password confirmation").fill("ivys new passphrase")
    page.get_by_role("button", name="Set password").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Password set")
    page.get_by_role("link", name="Sign in").click()
    page.get_by_label("User name").fill("ivy")
    page.get_by_label("Password").fill("ivys new passphrase")
    page.get_by_role("button", name="Sign in").click()

    page.wait_for_url(f"{live_server.url}/")


def test_a_member_of_another_account_gets_404_and_a_customer_no_staff_page(visitor, live_server):
    alice, bob = make_customer("alice"), make_customer("bob")
    channel = AlertChannel.objects.create(
        account=account(alice), kind="email", name="me", target="alice@example.com"
    )
    sign_in(visitor, bob, live_server)

    for path in (f"/account/channels/{channel.pk}", f"/account/channels/{channel.pk}/delete"):
        assert visitor.goto(path).status == 404
    assert visitor.goto("/account/channels").status == 200
    expect(visitor.get_by_text("alice@example.com")).to_have_count(0)

    staff = visitor.goto("/staff/")
    assert staff.status == 403 or visitor.url.startswith(f"{live_server.url}/accounts/login/")


def test_channels_and_tokens_show_their_secret_once_and_copy_it(visitor, live_server, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # no name resolves on the test machine
    user = make_customer("jo")
    sign_in(visitor, user, live_server)
    visitor.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = visitor

    page.goto("/account/channels")
    page.get_by_label("Kind").select_option("webhook")
    page.get_by_label("Name").fill("pager")
    page.get_by_label("Address or URL").fill("https://hooks.example/vtpu")
    page.get_by_role("button", name="Add channel").click()
    secret = AlertChannel.objects.get(account=account(user)).secret
    expect(page.locator("#new-secret")).to_have_text(secret)
    check_accessible(page)

    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto("/account/tokens")
    page.get_by_label("Name").fill("ci")
    page.get_by_role("button", name="Make token").click()
    token = page.locator("#new-token").inner_text()
    assert token.startswith("vtpu_")
    page.get_by_role("button", name="Copy token").click()
    expect(page.locator("#new-token-copied")).to_have_text("Copied.")
    assert page.evaluate("() => navigator.clipboard.readText()") == token
    check_accessible(page)

    page.goto("/account/tokens")
    expect(page.locator("#new-token")).to_have_count(0)
    page.get_by_role("button", name="Revoke ci").click()
    expect(page.get_by_role("status")).to_contain_text("Token ci revoked")


def test_billing_and_docs_pages_are_accessible(visitor, live_server, console):
    user = make_customer("kim")
    Invoice.objects.create(
        account=account(user),
        stripe_invoice_id="in_kims",
        status="open",
        currency="usd",
        total_cents=20000,
        amount_due_cents=20000,
        amount_paid_cents=0,
        stripe_created=timezone.now(),
        payment_error="Your card was declined.",
    )
    sign_in(visitor, user, live_server)

    visitor.goto("/account/billing")
    expect(visitor.get_by_role("button", name="Pay 200.00 USD now")).to_be_visible()
    check_accessible(visitor)
    visitor.get_by_role("button", name="Pay 200.00 USD now").click()
    expect(visitor.locator("[id^=pay-error-]")).to_contain_text("Save a card first")
    assert axe_violations(visitor) == []

    visitor.goto("/docs")
    expect(visitor.get_by_role("heading", level=1)).to_have_text("Using vTPU Cloud from scripts")
    check_accessible(visitor)
    assert script_errors(console) == []


def test_an_owner_invites_and_the_invitee_joins_in_the_browser(
    browser, visitor, live_server, mailoutbox
):
    owner = make_customer("lee")
    sign_in(visitor, owner, live_server)
    visitor.goto("/account/team")
    check_accessible(visitor)
    visitor.get_by_label("E-mail address").fill("max@example.com")
    visitor.get_by_role("button", name="Send invitation").click()
    expect(visitor.get_by_role("status")).to_contain_text("Invitation sent to max@example.com")
    (mail,) = mailoutbox

    context = browser.new_context(base_url=live_server.url)
    invitee = context.new_page()
    invitee.goto(path_of(link_in(mail)))
    expect(invitee.get_by_role("heading", level=1)).to_have_text("Join Lee Co")
    assert axe_violations(invitee) == []
    invitee.get_by_label("User name").fill("max")
    invitee.get_by_label("Password").fill("maxs long passphrase")
    invitee.get_by_role("button", name="Join Lee Co").click()
    invitee.wait_for_url(f"{live_server.url}/")
    context.close()

    visitor.reload()
    expect(visitor.get_by_role("cell", name="max", exact=True)).to_be_visible()
