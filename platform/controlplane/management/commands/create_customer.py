"""Create (or reuse) a customer: a person and their own account; with --token, print a new API
token acting for that account."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from accounts import selectors, services


class Command(BaseCommand):
    help = (
        "Create a customer (a user who owns an account of the same name, or of --account) and"
        " optionally a new API token, printed once."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--account", help="the account's name (default: the username)")
        parser.add_argument("--password", help="set this password (else the account has none)")
        parser.add_argument("--staff", action="store_true", help="make a staff superuser")
        parser.add_argument("--quota", type=int, help="most live nodes of the account")
        parser.add_argument("--token", metavar="NAME", help="create an API token with this name")

    @transaction.atomic
    def handle(self, *args, username: str, email: str, account: str | None,
               password: str | None, staff: bool, quota: int | None, token: str | None,
               **options) -> None:  # fmt: skip
        if not username.strip() or len(username) > 150:
            raise CommandError("username must be 1 to 150 characters")
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"email": email}
        )
        if password:
            user.set_password(password)
        if staff:
            user.is_staff = user.is_superuser = True
        user.save()
        owned = selectors.account_of_user(user=user)
        try:
            if owned is None:
                owned = services.account_create(name=account or username, owner=user)
            if quota is not None:
                services.account_set_quota(account=owned, node_quota=quota)
        except services.AccountError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(
            f"{'created' if created else 'exists'}: customer {username} of account"
            f" {owned.name!r} (id={owned.pk}, quota {owned.node_quota})"
        )
        if token:
            created_token = services.token_create(account=owned, user=user, name=token)
            self.stdout.write(f"API token (shown once): {created_token.secret}")
