"""Create (or reuse) a customer account and, with --token, print a new API token for it."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts.services import token_create


class Command(BaseCommand):
    help = "Create a customer (a Django user) and optionally a new API token, printed once."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="set this password (else the account has none)")
        parser.add_argument("--staff", action="store_true", help="make a staff superuser")
        parser.add_argument("--token", metavar="NAME", help="create an API token with this name")

    def handle(self, *args, username: str, email: str, password: str | None, staff: bool,
               token: str | None, **options) -> None:  # fmt: skip
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
        self.stdout.write(f"{'created' if created else 'exists'}: customer {username}")
        if token:
            created_token = token_create(user=user, name=token)
            self.stdout.write(f"API token (shown once): {created_token.secret}")
