"""Reads for accounts. An account only ever sees its own tokens."""

from django.db.models import QuerySet

from accounts.models import Account, ApiToken, Membership, User


def account_of_user(*, user: User) -> Account | None:
    """The account a person acts for (None for staff without one)."""
    membership = Membership.objects.select_related("account").filter(user_id=user.pk).first()
    return membership.account if membership else None


def token_list(*, account: Account) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(account=account, revoked_at__isnull=True)


def token_get(*, account: Account, token_id: int) -> ApiToken | None:
    return ApiToken.objects.filter(account=account, pk=token_id).first()
