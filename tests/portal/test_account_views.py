"""The account pages of the portal (portal.views.account), through Django's test client:
signing up, password reset, invitations, the team, alert channels, API tokens, billing and the
docs. Another account's objects are 404; refusals are shown next to the field at fault."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from accounts.models import ApiToken, Invitation, Membership
from billing.models import BillingCustomer, Invoice
from monitoring.models import AlertChannel
from tests.platform.conftest import account
from tests.portal import account_fixtures
from tests.portal.account_fixtures import link_in, path_of

carol, carol_web = account_fixtures.carol, account_fixtures.carol_web  # fixtures for these tests

pytestmark = pytest.mark.django_db

SIGN_UP = {
    "account_name": "Dora Labs",
    "username": "dora",
    "email": "dora@example.com",
    "password": "a long enough passphrase",
}


def field_error(response, field: str) -> str:
    """The text of the error list Django ties to `field`'s input (aria-describedby)."""
    html = response.content.decode()
    marker = f'id="id_{field}_error"'
    assert marker in html, f"no error next to {field}"
    return html.split(marker, 1)[1].split("</ul>", 1)[0]


# ---- signing up ---------------------------------------------------------------------------


def test_signing_up_makes_an_account_and_its_owner_and_lands_on_home(client):
    response = client.post("/accounts/signup/", SIGN_UP)

    assert response.status_code == 302 and response["Location"] == "/"
    user = get_user_model().objects.get(username="dora")
    assert user.email == "dora@example.com" and user.check_password(SIGN_UP["password"])
    assert user.membership.role == Membership.Role.OWNER
    assert user.membership.account.name == "Dora Labs"
    assert client.get("/").status_code == 200  # signed in


def test_the_sign_up_page_is_served_under_the_portals_policy(client):
    response = client.get("/accounts/signup/")

    assert response.status_code == 200
    assert "script-src 'self';" in response["Content-Security-Policy"]
    assert b'<label for="id_account_name">' in response.content


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"username": "alice"}, "username", "That user name is taken"),
        ({"username": "has space"}, "username", "letters, digits and @ . + - _ only"),
        ({"email": "not-an-address"}, "email", "Enter a valid email address"),
        ({"email": "ALICE@example.com"}, "email", "exists already"),
        ({"password": "short"}, "password", "too short"),
        ({"password": "dora.example"}, "password", "too similar"),
        ({"account_name": ""}, "account_name", "This field is required"),
        ({"account_name": "x" * 101}, "account_name", "at most 100 characters"),
    ],
)
def test_bad_sign_ups_are_refused_next_to_the_field(client, alice, change, field, words):
    response = client.post("/accounts/signup/", {**SIGN_UP, **change})

    assert response.status_code == 400
    assert words in field_error(response, field)
    assert not get_user_model().objects.filter(username=SIGN_UP["username"]).exists()


def test_sign_ups_from_one_address_are_throttled(client, settings):
    settings.ADMIN_LOGIN_MAX_FAILURES = 2
    for _ in range(2):
        assert client.post("/accounts/signup/", {**SIGN_UP, "password": "x"}).status_code == 400

    refused = client.post("/accounts/signup/", SIGN_UP)

    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert b"Too many sign-up attempts" in refused.content
    assert b'value="dora@example.com"' in refused.content  # what was typed stays
    assert SIGN_UP["password"].encode() not in refused.content
    assert not get_user_model().objects.filter(username="dora").exists()


def test_a_signed_in_customer_is_sent_home_from_sign_up(alice_web):
    response = alice_web.get("/accounts/signup/")

    assert response.status_code == 302 and response["Location"] == "/"


def test_signing_in_lands_on_the_portals_home(client, alice):
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})

    assert response.status_code == 302 and response["Location"] == "/"


# ---- password reset -------------------------------------------------------------------------


def test_a_password_reset_mail_link_sets_a_new_password(client, alice, mailoutbox):
    response = client.post("/accounts/password-reset/", {"email": "alice@example.com"})
    assert response.status_code == 302
    assert response["Location"] == "/accounts/password-reset/sent/"
    (mail,) = mailoutbox
    assert mail.to == ["alice@example.com"] and "alice" in mail.body

    form = client.get(path_of(link_in(mail)), follow=True)
    assert b"Choose a new password" in form.content
    done = client.post(
        form.redirect_chain[-1][0],
        {"new_password1": "a brand new passphrase", "new_password2": "a brand new passphrase"},
    )

    assert done["Location"] == "/accounts/reset/done/"
    alice.refresh_from_db()
    assert alice.check_password("a brand new passphrase")
    # The link is used up.
    again = client.get(path_of(link_in(mail)), follow=True)
    assert b"This link cannot be used" in again.content


def test_reset_mails_from_one_address_are_throttled(client, alice, settings, mailoutbox):
    settings.ADMIN_LOGIN_MAX_FAILURES = 1
    assert (
        client.post("/accounts/password-reset/", {"email": "alice@example.com"}).status_code == 302
    )

    refused = client.post("/accounts/password-reset/", {"email": "alice@example.com"})

    assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
    assert b"Too many reset requests" in refused.content
    assert len(mailoutbox) == 1


def test_a_reset_for_an_unknown_address_sends_nothing_and_says_the_same(client, mailoutbox):
    response = client.post("/accounts/password-reset/", {"email": "nobody@example.com"})

    assert response["Location"] == "/accounts/password-reset/sent/"
    assert mailoutbox == []


# ---- invitations and the team ---------------------------------------------------------------


def invite(client, email, capture):
    with capture(execute=True):
        return client.post("/account/team", {"email": email})


def test_the_owner_invites_and_the_invitee_joins_with_the_link(
    alice_web, alice, mailoutbox, django_capture_on_commit_callbacks, settings
):
    response = invite(alice_web, "erin@example.com", django_capture_on_commit_callbacks)

    assert response.status_code == 302
    (mail,) = mailoutbox
    assert mail.to == ["erin@example.com"] and "Alice Co" in mail.subject
    link = link_in(mail)
    assert link.startswith(settings.PUBLIC_URL + "/accounts/invitations/")
    invitation = Invitation.objects.get()
    assert link.rsplit("/", 2)[-2] not in invitation.sha256  # only the hash is stored
    team = alice_web.get("/account/team")
    assert b"erin@example.com" in team.content  # open invitation listed

    from django.test import Client

    erin = Client()
    page = erin.get(path_of(link))
    assert page.status_code == 200 and b"Join Alice Co" in page.content
    joined = erin.post(path_of(link), {"username": "erin", "password": "erins passphrase 1"})

    assert joined.status_code == 302 and joined["Location"] == "/"
    user = get_user_model().objects.get(username="erin")
    assert user.email == "erin@example.com"
    assert (user.membership.account, user.membership.role) == (account(alice), "member")
    invitation.refresh_from_db()
    assert invitation.accepted_by == user
    # Once only.
    used = Client().post(path_of(link), {"username": "erin2", "password": "erins passphrase 1"})
    assert used.status_code == 410 and b"used already" in used.content
    assert not get_user_model().objects.filter(username="erin2").exists()


def test_only_the_owner_invites(carol_web, mailoutbox, django_capture_on_commit_callbacks):
    response = invite(carol_web, "frank@example.com", django_capture_on_commit_callbacks)

    assert response.status_code == 403
    assert b'role="alert">Only the account\'s owner invites members.' in response.content
    assert not Invitation.objects.exists() and mailoutbox == []
    assert b"Send invitation" not in carol_web.get("/account/team").content


@pytest.mark.parametrize(
    ("email", "words"),
    [("not-an-address", "Enter a valid email address"), ("bob@example.com", "already has")],
)
def test_bad_invitations_are_refused_next_to_the_address(alice_web, bob, email, words):
    response = alice_web.post("/account/team", {"email": email})

    assert response.status_code == 400
    assert words in field_error(response, "email")
    assert not Invitation.objects.exists()


def test_a_wrong_or_expired_invitation_link_says_why(
    alice_web, mailoutbox, django_capture_on_commit_callbacks, client
):
    invite(alice_web, "erin@example.com", django_capture_on_commit_callbacks)
    path = path_of(link_in(mailoutbox[0]))
    invitation_id, secret = path.rstrip("/").rsplit("/", 2)[-2:]

    wrong = client.get(f"/accounts/invitations/{invitation_id}/{secret[:-1]}x/")
    assert wrong.status_code == 404 and b"not valid" in wrong.content
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    expired = client.post(path, {"username": "erin", "password": "erins passphrase 1"})
    assert expired.status_code == 410 and b"expired" in expired.content
    assert not get_user_model().objects.filter(username="erin").exists()


def test_a_bad_password_for_an_invitation_is_shown_and_the_link_still_works(
    alice_web, mailoutbox, django_capture_on_commit_callbacks, client
):
    invite(alice_web, "erin@example.com", django_capture_on_commit_callbacks)
    path = path_of(link_in(mailoutbox[0]))

    refused = client.post(path, {"username": "erin", "password": "123"})

    assert refused.status_code == 400
    assert "too short" in field_error(refused, "password")
    assert Invitation.objects.get().accepted_at is None
    assert (
        client.post(path, {"username": "erin", "password": "erins passphrase 1"}).status_code == 302
    )


# ---- alert channels ------------------------------------------------------------------------


def test_a_webhook_channel_shows_its_signing_secret_once(alice_web, alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # no name resolves on the test machine
    response = alice_web.post(
        "/account/channels",
        {"kind": "webhook", "name": "pager", "target": "https://example.com/hook"},
    )

    assert response.status_code == 201
    channel = AlertChannel.objects.get(account=account(alice))
    assert (channel.kind, channel.name, channel.target) == (
        "webhook",
        "pager",
        "https://example.com/hook",
    )
    assert channel.secret and channel.secret.encode() in response.content
    listing = alice_web.get("/account/channels")
    assert b"pager" in listing.content and channel.secret.encode() not in listing.content


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"kind": "email", "name": "me", "target": "nope"}, "target", "not an e-mail address"),
        ({"kind": "webhook", "name": "w", "target": "ftp://x"}, "target", "A webhook URL must"),
        (
            {"kind": "webhook", "name": "w", "target": "https://127.0.0.1/hook"},
            "target",
            "127.0.0.1, which is not a public address.",
        ),
        ({"kind": "sms", "name": "me", "target": "a@b.co"}, "kind", "Select a valid choice"),
        ({"kind": "email", "name": "", "target": "a@b.co"}, "name", "This field is required"),
    ],
)
def test_bad_channels_are_refused_next_to_the_field(alice_web, data, field, words):
    response = alice_web.post("/account/channels", data)

    assert response.status_code == 400
    assert words in field_error(response, field)
    assert not AlertChannel.objects.exists()


def test_a_channel_is_edited_rotated_and_deleted(alice_web, alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True  # no name resolves on the test machine
    channel = AlertChannel.objects.create(
        account=account(alice), kind="webhook", name="w", target="https://a.example/h", secret="s1"
    )

    saved = alice_web.post(
        f"/account/channels/{channel.pk}",
        {"name": "pager", "target": "https://b.example/h", "enabled": ""},
    )
    assert saved.status_code == 302
    channel.refresh_from_db()
    assert (channel.name, channel.target, channel.enabled, channel.secret) == (
        "pager",
        "https://b.example/h",
        False,
        "s1",
    )

    rotated = alice_web.post(
        f"/account/channels/{channel.pk}",
        {"name": "pager", "target": "https://b.example/h", "enabled": "on", "rotate_secret": "on"},
    )
    channel.refresh_from_db()
    assert channel.secret != "s1" and channel.secret.encode() in rotated.content

    bad = alice_web.post(f"/account/channels/{channel.pk}", {"name": "p", "target": "nope"})
    assert bad.status_code == 400 and "http" in field_error(bad, "target")

    assert (
        b"Delete channel pager?" in alice_web.get(f"/account/channels/{channel.pk}/delete").content
    )
    assert alice_web.post(f"/account/channels/{channel.pk}/delete").status_code == 302
    assert not AlertChannel.objects.filter(pk=channel.pk).exists()


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("suffix", ["", "/delete"])
def test_another_accounts_channel_is_404(alice, bob_web, method, suffix):
    channel = AlertChannel.objects.create(
        account=account(alice), kind="email", name="me", target="alice@example.com"
    )

    response = getattr(bob_web, method)(
        f"/account/channels/{channel.pk}{suffix}", {"name": "x", "target": "bob@example.com"}
    )

    assert response.status_code == 404
    channel.refresh_from_db()
    assert (channel.name, channel.target) == ("me", "alice@example.com")


# ---- API tokens ----------------------------------------------------------------------------


def test_a_token_is_shown_once_works_and_is_revoked(alice_web, alice, client):
    response = alice_web.post("/account/tokens", {"name": "deploy script"})

    assert response.status_code == 201
    token = ApiToken.objects.get(account=account(alice), name="deploy script")
    secret = response.content.decode().split('id="new-token">', 1)[1].split("<", 1)[0]
    assert secret.startswith("vtpu_" + token.prefix)
    api = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    assert client.get("/api/v1/nodes", **api).status_code == 200
    listing = alice_web.get("/account/tokens").content
    assert b"<td>deploy script</td>" in listing and secret.encode() not in listing

    revoked = alice_web.post(f"/account/tokens/{token.pk}/revoke")

    assert revoked.status_code == 302
    assert client.get("/api/v1/nodes", **api).status_code == 401
    assert b"<td>deploy script</td>" not in alice_web.get("/account/tokens").content


def test_a_token_needs_a_name(alice_web):
    response = alice_web.post("/account/tokens", {"name": "  "})

    assert response.status_code == 400
    assert "This field is required" in field_error(response, "name")
    assert not ApiToken.objects.exists()


def test_another_accounts_token_is_404_and_stays_active(alice, bob_web):
    from accounts.services import token_create

    token = token_create(account=account(alice), user=alice, name="alices").token

    assert bob_web.post(f"/account/tokens/{token.pk}/revoke").status_code == 404
    assert bob_web.post("/account/tokens/99999999999999999999/revoke").status_code == 404
    token.refresh_from_db()
    assert token.is_active
    assert b"alices" not in bob_web.get("/account/tokens").content


# ---- billing -------------------------------------------------------------------------------


def an_invoice(user, number: str, status: str = "open") -> Invoice:
    return Invoice.objects.create(
        account=account(user),
        stripe_invoice_id=number,
        status=status,
        currency="usd",
        total_cents=20000,
        amount_due_cents=20000,
        amount_paid_cents=0,
        stripe_created=timezone.now(),
        payment_error="Your card was declined." if status == "open" else "",
    )


def test_billing_shows_this_accounts_invoices_with_their_payments(alice_web, alice, bob):
    an_invoice(alice, "in_alices")
    an_invoice(bob, "in_bobs")

    response = alice_web.get("/account/billing")

    assert response.status_code == 200
    html = response.content.decode()
    assert "in_alices" in html and "in_bobs" not in html
    assert "200.00 USD" in html and "Your card was declined." in html
    assert "Pay 200.00 USD now" in html
    assert 'href="/billing/card"' in html and "No card yet." in html


def test_paying_without_a_card_says_so_next_to_the_invoice(alice_web, alice):
    invoice = an_invoice(alice, "in_alices")

    response = alice_web.post(f"/account/billing/invoices/{invoice.pk}/pay")

    assert response.status_code == 402
    html = response.content.decode()
    error = html.split(f'id="pay-error-{invoice.pk}"', 1)[1].split("</p>", 1)[0]
    assert "Save a card first" in error


def test_another_accounts_invoice_is_404(alice, bob_web):
    invoice = an_invoice(alice, "in_alices")

    assert bob_web.post(f"/account/billing/invoices/{invoice.pk}/pay").status_code == 404
    assert b"in_alices" not in bob_web.get("/account/billing").content


def test_cancelling_and_taking_it_back(alice_web, alice, stripe_on):
    assert b"Cancel the account?" in alice_web.get("/account/billing/cancel").content

    assert alice_web.post("/account/billing/cancel").status_code == 302
    customer = BillingCustomer.objects.get(account=account(alice))
    assert customer.cancel_requested_at is not None
    assert b"Keep my account" in alice_web.get("/account/billing").content

    assert alice_web.post("/account/billing/keep").status_code == 302
    customer.refresh_from_db()
    assert customer.cancel_requested_at is None


def test_taking_back_what_was_not_cancelled_says_so_by_the_cancel_button(alice_web, stripe_on):
    response = alice_web.post("/account/billing/keep")

    assert response.status_code == 409
    error = response.content.decode().split('id="cancel-error"', 1)[1].split("</p>", 1)[0]
    assert "not being cancelled" in error


def test_cancelling_without_billing_says_billing_is_off(alice_web, settings):
    settings.STRIPE_SECRET_KEY = ""

    response = alice_web.post("/account/billing/cancel")

    assert response.status_code == 503
    assert "Billing is off" in response.content.decode().split('id="cancel-error"', 1)[1]


# ---- docs, and who may see the pages ---------------------------------------------------------


def test_the_docs_have_this_control_planes_urls(alice_web, alice, settings, local_host):
    from fleet.models import Node

    response = alice_web.get("/docs")
    html = response.content.decode()
    assert f"{settings.PUBLIC_URL}/api/v1/" in html
    assert f'href="{settings.PUBLIC_URL}/api/v1/schema/"' in html
    assert "/v1/embeddings" in html and "/vTPU/telemetry" in html

    node = Node.objects.create(
        account=account(alice), name="n1", host=local_host, agent_url="http://10.0.0.7:18000"
    )
    html = alice_web.get("/docs").content.decode()
    assert "export AGENT=http://10.0.0.7:18000" in html and str(node.pk) in html


ACCOUNT_PAGES = [
    "/account/team",
    "/account/channels",
    "/account/tokens",
    "/account/billing",
    "/account/billing/cancel",
    "/docs",
]


@pytest.mark.parametrize("path", ACCOUNT_PAGES)
def test_account_pages_need_a_sign_in(client, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


@pytest.mark.parametrize("path", ACCOUNT_PAGES)
def test_account_pages_are_404_for_a_user_without_an_account(client, path):
    client.force_login(get_user_model().objects.create_user("lone", "lone@example.com", "pw"))

    assert client.get(path).status_code == 404


@pytest.mark.parametrize("path", ACCOUNT_PAGES)
def test_account_pages_render_for_a_member(carol_web, path):
    response = carol_web.get(path)

    assert response.status_code == 200
    assert "default-src 'none'" in response["Content-Security-Policy"]
