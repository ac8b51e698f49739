"""Routes of portal.views.account: signing up, password reset, invitations, and the account's
own pages. Pages with an object id in the path are tested for 404 across accounts in
tests/portal/test_account_views.py."""

from django.urls import path

from portal.views import account

urlpatterns = [
    path("accounts/signup/", account.sign_up, name="signup"),
    path("accounts/password-reset/", account.password_reset, name="password_reset"),
    path("accounts/password-reset/sent/", account.password_reset_done, name="password_reset_done"),
    path(
        "accounts/reset/<uidb64>/<token>/",
        account.password_reset_confirm,
        name="password_reset_confirm",
    ),
    path("accounts/reset/done/", account.password_reset_complete, name="password_reset_complete"),
    path(
        "accounts/invitations/<int:invitation_id>/<str:secret>/",
        account.invitation_accept,
        name="invitation-accept",
    ),
    path("account/team", account.team, name="account-team"),
    path("account/channels", account.channels, name="account-channels"),
    path("account/channels/<int:channel_id>", account.channel_edit, name="account-channel"),
    path(
        "account/channels/<int:channel_id>/delete",
        account.channel_delete,
        name="account-channel-delete",
    ),
    path("account/tokens", account.tokens, name="account-tokens"),
    path("account/tokens/<int:token_id>/revoke", account.token_revoke, name="account-token-revoke"),
    path("account/billing", account.billing, name="account-billing"),
    path("account/billing/cancel", account.billing_cancel, name="account-billing-cancel"),
    path("account/billing/keep", account.billing_keep, name="account-billing-keep"),
    path(
        "account/billing/invoices/<int:invoice_id>/pay",
        account.invoice_pay,
        name="account-invoice-pay",
    ),
    path("docs", account.docs, name="portal-docs"),
]
