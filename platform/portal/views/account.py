"""The account's pages (docs/architecture.md, "Portal"): signing up, password reset, joining
by invitation, the team, alert channels, API tokens, billing and the docs.

Forms check the shape of what people type; the services (accounts.services,
monitoring.services, billing.subscriptions) decide, as they do for the API, and their refusals
are shown next to the field at fault. A secret (an API token, a webhook's signing secret) is
shown in the answer to the form that made it, once, and never again. Anything of another
account is 404, like something that does not exist.
"""

from __future__ import annotations

import functools
import time

import stripe
from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import PasswordResetForm
from django.core.cache import cache
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse, reverse_lazy
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from rest_framework.throttling import BaseThrottle

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import Account
from billing import subscriptions
from billing.models import BillingCustomer, Invoice, Plan
from controlplane.csp import with_policy
from controlplane.errors import ServiceError
from fleet import selectors as fleet_selectors
from monitoring import services as monitoring_services
from monitoring.models import AlertChannel
from portal.views.base import account_of, page

MAX_ID = 2**63 - 1  # larger ids in a path cannot exist (and would overflow the database's bigint)


def _show(form: forms.Form, exc: ServiceError) -> None:
    """A service's refusal, next to the field it names (or above the form)."""
    message = exc.message[:1].upper() + exc.message[1:]  # some services answer in fragments
    if not message.endswith((".", "?", "!")):
        message += "."
    form.add_error(exc.field if exc.field in form.fields else None, message)


def _stripe_words(exc: stripe.StripeError) -> str:
    return f"Stripe did not answer ({exc.user_message or exc}). Nothing changed; retry in a minute."


# ---- signing up, signing in, password reset, invitations ---------------------------------------


class NewUserFields(forms.Form):
    username = forms.CharField(
        label="User name",
        max_length=150,
        help_text="Letters, digits and @ . + - _ only; you sign in with it.",
        widget=forms.TextInput(attrs={"autocomplete": "username"}),
    )
    password = forms.CharField(
        label="Password",
        strip=False,
        help_text="At least 8 characters, not only digits, not like your user name.",
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )


class SignUpForm(NewUserFields):
    account_name = forms.CharField(
        label="Account name",
        max_length=100,
        help_text="Your company's name, or your own: it owns your nodes and pays for them.",
        widget=forms.TextInput(attrs={"autocomplete": "organization"}),
    )
    email = forms.EmailField(
        label="E-mail address",
        help_text="For password resets and invoices.",
        widget=forms.EmailInput(attrs={"autocomplete": "email"}),
    )
    field_order = ["account_name", "username", "email", "password"]


def _refused_for(request: HttpRequest, what: str) -> int:
    """Seconds until this address may try `what` (signing up, asking for a password reset mail)
    again; 0: now. Every attempt counts, ADMIN_LOGIN_MAX_FAILURES per ADMIN_LOGIN_WINDOW_SECONDS
    per address, in fixed windows of Django's cache like the sign-in pages'
    (controlplane.admin_throttle)."""
    period = settings.ADMIN_LOGIN_WINDOW_SECONDS
    now = time.time()
    window = int(now // period)
    key = f"{what}-attempts:{window}:{BaseThrottle().get_ident(request)}"
    cache.add(key, 0, timeout=period + 1)
    try:
        attempts = cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=period + 1)
        attempts = 1
    if attempts > settings.ADMIN_LOGIN_MAX_FAILURES:
        return max(1, int((window + 1) * period - now) + 1)
    return 0


def _kept(request: HttpRequest, form_class) -> dict:
    """What was typed into a refused form, but its passwords: shown again as initial values."""
    return {
        name: request.POST.get(name, "")
        for name, field in form_class.base_fields.items()
        if not isinstance(field.widget, forms.PasswordInput)
    }


@require_http_methods(["GET", "POST"])
def sign_up(request: HttpRequest) -> HttpResponse:
    """A new customer: their account and its owner, signed in on the portal's home."""
    if request.user.is_authenticated:
        return redirect("portal-home")
    form = SignUpForm(request.POST if request.method == "POST" else None)
    if request.method == "GET":
        return page(request, "portal/account/signup.html", {"form": form})
    retry_after = _refused_for(request, "signup")
    if retry_after:
        response = page(
            request,
            "portal/account/signup.html",
            {"form": SignUpForm(initial=_kept(request, SignUpForm)), "retry_after": retry_after},
            status=429,
        )
        response["Retry-After"] = str(retry_after)
        return response
    if form.is_valid():
        try:
            user = account_services.customer_sign_up(**form.cleaned_data)
        except ServiceError as exc:
            _show(form, exc)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome to vTPU Cloud, {user.get_username()}.")
            return redirect("portal-home")
    return page(request, "portal/account/signup.html", {"form": form}, status=400)


def _under_policy(view):
    """Django's own auth views, answered under the portal's Content-Security-Policy."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        return with_policy(view(request, *args, **kwargs))

    return wrapped


_password_reset_form = _under_policy(
    auth_views.PasswordResetView.as_view(
        template_name="accounts/password_reset_form.html",
        email_template_name="accounts/password_reset_email.txt",
        subject_template_name="accounts/password_reset_subject.txt",
        success_url=reverse_lazy("password_reset_done"),
    )
)


def password_reset(request: HttpRequest) -> HttpResponse:
    """Django's form that mails a reset link, throttled per address like signing up (each
    attempt may send a mail to anyone's address)."""
    if request.method == "POST":
        retry_after = _refused_for(request, "password-reset")
        if retry_after:
            response = page(
                request,
                "accounts/password_reset_form.html",
                {
                    "form": PasswordResetForm(initial=_kept(request, PasswordResetForm)),
                    "retry_after": retry_after,
                },
                status=429,
            )
            response["Retry-After"] = str(retry_after)
            return response
    return _password_reset_form(request)


password_reset_done = _under_policy(
    auth_views.PasswordResetDoneView.as_view(template_name="accounts/password_reset_done.html")
)
password_reset_confirm = _under_policy(
    auth_views.PasswordResetConfirmView.as_view(
        template_name="accounts/password_reset_confirm.html",
        success_url=reverse_lazy("password_reset_complete"),
    )
)
password_reset_complete = _under_policy(
    auth_views.PasswordResetCompleteView.as_view(
        template_name="accounts/password_reset_complete.html"
    )
)


@require_http_methods(["GET", "POST"])
def invitation_accept(request: HttpRequest, invitation_id: int, secret: str) -> HttpResponse:
    """The invitee chooses a user name and a password, joins the account, and is signed in."""
    try:
        invitation = account_services.invitation_check(invitation_id=invitation_id, secret=secret)
    except ServiceError as exc:
        return page(
            request, "portal/account/invitation.html", {"refusal": exc.message}, status=exc.status
        )
    form = NewUserFields(request.POST if request.method == "POST" else None)
    context = {"form": form, "invitation": invitation}
    if request.method == "GET":
        return page(request, "portal/account/invitation.html", context)
    if form.is_valid():
        try:
            user = account_services.invitation_accept(
                invitation_id=invitation_id, secret=secret, **form.cleaned_data
            )
        except ServiceError as exc:
            _show(form, exc)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome to {invitation.account.name}.")
            return redirect("portal-home")
    return page(request, "portal/account/invitation.html", context, status=400)


# ---- the team ------------------------------------------------------------------------------


class InviteForm(forms.Form):
    email = forms.EmailField(
        label="E-mail address",
        help_text="We send a link to it; the person chooses a user name and a password there.",
        widget=forms.EmailInput(attrs={"autocomplete": "off"}),
    )


@login_required
@require_http_methods(["GET", "POST"])
def team(request: HttpRequest) -> HttpResponse:
    """The account's members and open invitations; the owner invites people here."""
    account = account_of(request)
    owner = account_services.is_owner(account=account, user=request.user)
    form = InviteForm(request.POST if request.method == "POST" else None)
    status = 200
    if request.method == "POST":
        if not owner:
            return _team_page(request, account, owner, InviteForm(), status=403)
        if form.is_valid():
            try:
                invitation = account_services.member_invite(
                    account=account, by=request.user, email=form.cleaned_data["email"]
                )
            except ServiceError as exc:
                _show(form, exc)
            else:
                messages.success(
                    request,
                    f"Invitation sent to {invitation.email}; its link works once, for"
                    f" {account_services.INVITATION_DAYS} days.",
                )
                return redirect("account-team")
        status = 400
    return _team_page(request, account, owner, form, status=status)


def _team_page(
    request: HttpRequest, account: Account, owner: bool, form: InviteForm, *, status: int
) -> HttpResponse:
    context = {
        "account": account,
        "owner": owner,
        "form": form,
        "members": account.memberships.select_related("user").order_by("created"),
        "invitations": account.invitations.filter(accepted_at=None, expires_at__gt=timezone.now()),
        "forbidden": status == 403,
    }
    return page(request, "portal/account/team.html", context, status=status)


# ---- alert channels ------------------------------------------------------------------------


class ChannelForm(forms.Form):
    kind = forms.ChoiceField(
        label="Kind",
        choices=[("email", "E-mail"), ("webhook", "Webhook (signed JSON POST)")],
    )
    name = forms.CharField(
        label="Name", max_length=100, help_text="Yours, to tell channels apart (e.g. on-call)."
    )
    target = forms.CharField(
        label="Address or URL",
        max_length=500,
        help_text="An e-mail address, or the https:// URL a webhook POSTs to.",
    )


class ChannelEditForm(forms.Form):
    name = forms.CharField(label="Name", max_length=100)
    target = forms.CharField(label="Address or URL", max_length=500)
    enabled = forms.BooleanField(
        label="Enabled", required=False, help_text="A disabled channel receives nothing."
    )


class WebhookEditForm(ChannelEditForm):
    rotate_secret = forms.BooleanField(
        label="Make a new signing secret",
        required=False,
        help_text="The old one stops working at once; the new one is shown once.",
    )


def _own_channel(account: Account, channel_id: int) -> AlertChannel:
    channel = None
    if 1 <= channel_id <= MAX_ID:
        channel = AlertChannel.objects.filter(account=account, pk=channel_id).first()
    if channel is None:
        raise Http404("No such alert channel in your account.")
    return channel


@login_required
@require_http_methods(["GET", "POST"])
def channels(request: HttpRequest) -> HttpResponse:
    """The account's alert channels, and a form for a new one."""
    account = account_of(request)
    form = ChannelForm(request.POST if request.method == "POST" else None)
    context: dict = {"form": form}
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                context["created"] = monitoring_services.channel_create(
                    account=account, **form.cleaned_data
                )
            except ServiceError as exc:
                _show(form, exc)
                status = 400
            else:
                context["form"] = ChannelForm()
                status = 201
        else:
            status = 400
    context["channels"] = AlertChannel.objects.filter(account=account)
    return page(request, "portal/account/channels.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def channel_edit(request: HttpRequest, channel_id: int) -> HttpResponse:
    channel = _own_channel(account_of(request), channel_id)
    form_class = WebhookEditForm if channel.kind == AlertChannel.Kind.WEBHOOK else ChannelEditForm
    if request.method == "GET":
        form = form_class(
            initial={"name": channel.name, "target": channel.target, "enabled": channel.enabled}
        )
        return page(request, "portal/account/channel_edit.html", {"channel": channel, "form": form})
    form = form_class(request.POST)
    if form.is_valid():
        v = form.cleaned_data
        try:
            monitoring_services.channel_update(
                channel=channel,
                name=v["name"],
                target=v["target"],
                enabled=v["enabled"],
                rotate_secret=v.get("rotate_secret", False),
            )
        except ServiceError as exc:
            _show(form, exc)
        else:
            if v.get("rotate_secret"):
                return page(
                    request,
                    "portal/account/channel_edit.html",
                    {
                        "channel": channel,
                        "form": form_class(initial={**v, "rotate_secret": False}),
                        "rotated": True,
                    },
                )
            messages.success(request, f"Channel {channel.name} saved.")
            return redirect("account-channels")
    channel.refresh_from_db()
    return page(
        request, "portal/account/channel_edit.html", {"channel": channel, "form": form}, status=400
    )


@login_required
@require_http_methods(["GET", "POST"])
def channel_delete(request: HttpRequest, channel_id: int) -> HttpResponse:
    channel = _own_channel(account_of(request), channel_id)
    if request.method == "GET":
        return page(request, "portal/account/channel_delete.html", {"channel": channel})
    channel.delete()
    messages.success(request, f"Channel {channel.name} deleted: it receives no more alerts.")
    return redirect("account-channels")


# ---- API tokens ----------------------------------------------------------------------------


class TokenForm(forms.Form):
    name = forms.CharField(
        label="Name",
        max_length=100,
        help_text="What the token is for (e.g. deploy script), to recognise it later.",
    )


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    """The account's API tokens (their first characters only), and a form for a new one."""
    account = account_of(request)
    form = TokenForm(request.POST if request.method == "POST" else None)
    context: dict = {"form": form}
    status = 200
    if request.method == "POST":
        if form.is_valid():
            context["created"] = account_services.token_create(
                account=account, user=request.user, name=form.cleaned_data["name"]
            )
            context["form"] = TokenForm()
            status = 201
        else:
            status = 400
    context["tokens"] = account_selectors.token_list(account=account).select_related("user")
    return page(request, "portal/account/tokens.html", context, status=status)


@login_required
@require_POST
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    token = None
    if 1 <= token_id <= MAX_ID:
        token = account_selectors.token_get(account=account_of(request), token_id=token_id)
    if token is None:
        raise Http404("No such token in your account.")
    account_services.token_revoke(token=token)
    messages.success(request, f"Token {token.name} revoked: scripts using it are refused now.")
    return redirect("account-tokens")


# ---- billing -------------------------------------------------------------------------------


def _money(cents: int, currency: str) -> str:
    return f"{cents / 100:,.2f} {currency.upper()}"


def _billing_page(
    request: HttpRequest, account: Account, *, errors: dict | None = None, status: int = 200
) -> HttpResponse:
    customer = BillingCustomer.objects.filter(account=account).first()
    invoices = list(Invoice.objects.filter(account=account).order_by("-stripe_created", "-id"))
    errors = errors or {}
    for invoice in invoices:
        invoice.refusal = errors.get(("invoice", invoice.pk), "")
        invoice.total = _money(invoice.total_cents, invoice.currency)
        invoice.paid = _money(invoice.amount_paid_cents, invoice.currency)
    plans = list(Plan.objects.filter(active=True).order_by("node_kind", "amount_cents", "pk"))
    for plan in plans:
        plan.price = _money(plan.amount_cents, plan.currency)
        plan.sla_percent = f"{plan.sla_target * 100:g}"
    context = {
        "enabled": subscriptions.billing_enabled(),
        "customer": customer,
        "plans": plans,
        "subscriptions": account.subscriptions.select_related("plan").order_by("-created"),
        "invoices": invoices,
        "cancel_error": errors.get("cancel", ""),
    }
    return page(request, "portal/account/billing.html", context, status=status)


@login_required
@require_safe
def billing(request: HttpRequest) -> HttpResponse:
    """Plans, subscriptions, invoices with their payments, the card, and cancelling."""
    return _billing_page(request, account_of(request))


def _billing_act(request: HttpRequest, where, act, done: str) -> HttpResponse:
    """Run a billing service; its refusal is shown at `where` on the billing page."""
    account = account_of(request)
    try:
        act(account)
    except ServiceError as exc:
        return _billing_page(request, account, errors={where: exc.message}, status=exc.status)
    except stripe.StripeError as exc:
        return _billing_page(request, account, errors={where: _stripe_words(exc)}, status=502)
    messages.success(request, done)
    return redirect("account-billing")


@login_required
@require_http_methods(["GET", "POST"])
def billing_cancel(request: HttpRequest) -> HttpResponse:
    account = account_of(request)
    if request.method == "GET":
        customer = BillingCustomer.objects.filter(account=account).first()
        return page(request, "portal/account/billing_cancel.html", {"customer": customer})
    return _billing_act(
        request,
        "cancel",
        lambda a: subscriptions.account_cancel(account=a, user=request.user),
        "Your account is cancelled: your nodes run until the end of the paid period, then they"
        " are deprovisioned. You can take this back until then.",
    )


@login_required
@require_POST
def billing_keep(request: HttpRequest) -> HttpResponse:
    return _billing_act(
        request,
        "cancel",
        lambda a: subscriptions.account_cancel_undo(account=a),
        "Cancellation taken back: your account and its nodes stay.",
    )


@login_required
@require_POST
def invoice_pay(request: HttpRequest, invoice_id: int) -> HttpResponse:
    account = account_of(request)
    invoice = None
    if 1 <= invoice_id <= MAX_ID:
        invoice = Invoice.objects.filter(account=account, pk=invoice_id).first()
    if invoice is None:
        raise Http404("No such invoice in your account.")
    return _billing_act(
        request,
        ("invoice", invoice.pk),
        lambda a: subscriptions.invoice_pay(account=a, invoice=invoice),
        f"Invoice {invoice.stripe_invoice_id} paid.",
    )


# ---- docs ----------------------------------------------------------------------------------


@login_required
@require_safe
def docs(request: HttpRequest) -> HttpResponse:
    """Copy-paste examples with this control plane's URL and, once there is one, a node's
    agent URL."""
    account = account_of(request)
    node = (
        fleet_selectors.node_list(account=account).exclude(agent_url="").order_by("created").first()
    )
    context = {
        "base_url": settings.PUBLIC_URL,
        "schema_url": settings.PUBLIC_URL + reverse("schema"),
        "node": node,
        "agent_url": node.agent_url if node else "https://<your node's agent URL>",
    }
    return page(request, "portal/account/docs.html", context)
