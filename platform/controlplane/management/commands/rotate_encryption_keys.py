"""Re-encrypt every encrypted field with the first FIELD_ENCRYPTION_KEY key."""

import argparse

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, DjangoHelpFormatter
from django.db import models, transaction
from django.db.models.functions import Cast
from django.db.models.lookups import Exact

from fleet.crypto import EncryptedTextField, decrypt, is_current

BATCH_SIZE = 500


class _HelpFormatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Django's option order, and the description's line breaks kept (the procedure)."""


class Command(BaseCommand):
    help = """\
Re-encrypt every encrypted field (SSH keys, node tokens: every EncryptedTextField of every
model) with the first key of FIELD_ENCRYPTION_KEY, and report how many values changed.

Rotating the key, with no downtime:
  1. Make a new key (e.g. `python -c "import secrets; print(secrets.token_urlsafe(48))"`).
  2. Put it first, the old key after it: FIELD_ENCRYPTION_KEY=NEW,OLD (in a
     FIELD_ENCRYPTION_KEY_FILE: NEW on the first line, OLD on the next). Restart every
     process (web, Celery worker and beat): they now write with NEW and read both.
  3. Run this command. It is safe to run again; values already under NEW are left alone.
  4. Once it reports no failure, remove OLD (FIELD_ENCRYPTION_KEY=NEW) and restart again.
A value none of the keys decrypts is reported and left as it is (the command exits non-zero):
add the key it was written with and run the command again, or enter that secret again."""

    def create_parser(self, prog_name, subcommand, **kwargs):
        return super().create_parser(
            prog_name, subcommand, formatter_class=_HelpFormatter, **kwargs
        )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would change, change nothing"
        )

    def handle(self, *args, dry_run: bool = False, **options) -> None:
        totals = {"rotated": 0, "current": 0, "failed": 0}
        for model, field in encrypted_fields():
            counts = rotate_field(model, field, dry_run=dry_run)
            for name, count in counts.items():
                totals[name] += count
            label = f"{model._meta.label}.{field.name}"
            self.stdout.write(
                f"{label}: {counts['rotated']} re-encrypted, {counts['current']} already under"
                f" the first key, {counts['failed']} undecryptable"
            )
        verb = "would be re-encrypted (dry run)" if dry_run else "re-encrypted"
        self.stdout.write(
            f"total: {totals['rotated']} {verb}, {totals['current']} already current,"
            f" {totals['failed']} undecryptable"
        )
        if totals["failed"]:
            raise CommandError(
                f"{totals['failed']} value(s) could not be decrypted with any key in"
                " FIELD_ENCRYPTION_KEY; keep the old keys until they are fixed (see --help)"
            )


def encrypted_fields() -> list[tuple[type[models.Model], EncryptedTextField]]:
    """Every concrete EncryptedTextField of every installed model."""
    return [
        (model, field)
        for model in apps.get_models()
        for field in model._meta.concrete_fields
        if isinstance(field, EncryptedTextField)
    ]


def rotate_field(model: type[models.Model], field: EncryptedTextField, *, dry_run: bool) -> dict:
    """Walks the table by primary key in batches; rewrites the values the first key cannot read."""
    counts = {"rotated": 0, "current": 0, "failed": 0}
    manager = model._base_manager
    # Cast to a plain TextField: the stored token, not the field's decrypted value.
    raw = manager.exclude(**{field.name: ""}).exclude(**{f"{field.name}__isnull": True})
    raw = raw.annotate(_ciphertext=Cast(field.name, models.TextField())).order_by("pk")
    last_pk = None
    while True:
        page = raw if last_pk is None else raw.filter(pk__gt=last_pk)
        batch = list(page.values_list("pk", "_ciphertext")[:BATCH_SIZE])
        if not batch:
            return counts
        last_pk = batch[-1][0]
        with transaction.atomic():
            for pk, ciphertext in batch:
                if is_current(ciphertext):
                    counts["current"] += 1
                    continue
                try:
                    clear = decrypt(ciphertext)
                except ValueError:
                    counts["failed"] += 1
                    continue
                if not dry_run:
                    # update() encrypts through the field, with the first key; only while the
                    # row holds what was read, so a value written meanwhile is not overwritten.
                    unchanged = Exact(Cast(field.name, models.TextField()), ciphertext)
                    manager.filter(unchanged, pk=pk).update(**{field.name: clear})
                counts["rotated"] += 1
