"""Encrypted fields under several keys (fleet.crypto) and the rotate_encryption_keys command."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from fleet.crypto import key_list
from fleet.models import Host

pytestmark = pytest.mark.django_db

KEY_A, KEY_B, KEY_C = "key-a-" + "a" * 40, "key-b-" + "b" * 40, "key-c-" + "c" * 40
PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-material\n-----END OPENSSH PRIVATE KEY-----"


def stored(host: Host) -> str:
    """The column as the database holds it (the Fernet token)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT ssh_private_key FROM {Host._meta.db_table} WHERE id = %s", [host.pk]
        )
        return cursor.fetchone()[0]


def make_host(name: str) -> Host:
    return Host.objects.create(
        name=name, kind=Host.Kind.SSH, address="192.0.2.1", ssh_user="root", ssh_private_key=PEM
    )


def rotate(*args: str) -> str:
    out = io.StringIO()
    call_command("rotate_encryption_keys", *args, stdout=out)
    return out.getvalue()


def test_keys_are_separated_by_commas_or_lines_newest_first():
    assert key_list(f" {KEY_B} ,{KEY_A}\n") == [KEY_B, KEY_A]
    assert key_list(f"{KEY_B}\n{KEY_A}\n\n") == [KEY_B, KEY_A]
    with pytest.raises(ValueError, match="holds no key"):
        key_list(" ,\n")


def test_a_value_is_stored_encrypted_and_read_back_clear(settings):
    settings.FIELD_ENCRYPTION_KEY = KEY_A
    host = make_host("h1")
    assert "secret-material" not in stored(host)
    assert Host.objects.get(pk=host.pk).ssh_private_key == PEM


def test_a_value_written_under_the_old_key_reads_once_a_new_key_comes_first(settings):
    settings.FIELD_ENCRYPTION_KEY = KEY_A
    host = make_host("h1")
    settings.FIELD_ENCRYPTION_KEY = f"{KEY_B},{KEY_A}"
    assert Host.objects.get(pk=host.pk).ssh_private_key == PEM
    settings.FIELD_ENCRYPTION_KEY = KEY_B
    with pytest.raises(ValueError, match="no longer there. Add that key back"):
        Host.objects.get(pk=host.pk)


def test_rotation_re_encrypts_every_value_under_the_first_key(settings):
    settings.FIELD_ENCRYPTION_KEY = KEY_A
    hosts = [make_host(f"h{i}") for i in range(3)]
    empty = Host.objects.create(name="local", kind=Host.Kind.LOCAL)  # nothing to rotate
    before = [stored(h) for h in hosts]
    settings.FIELD_ENCRYPTION_KEY = f"{KEY_B}\n{KEY_A}"

    dry = rotate("--dry-run")
    assert "total: 3 would be re-encrypted (dry run)" in dry
    assert [stored(h) for h in hosts] == before

    report = rotate()
    assert "fleet.Host.ssh_private_key: 3 re-encrypted, 0 already under the first key" in report
    assert "total: 3 re-encrypted, 0 already current, 0 undecryptable" in report
    assert all(stored(h) != b for h, b in zip(hosts, before, strict=True))

    settings.FIELD_ENCRYPTION_KEY = KEY_B  # the old key is gone: everything still reads
    assert [Host.objects.get(pk=h.pk).ssh_private_key for h in hosts] == [PEM] * 3
    assert Host.objects.get(pk=empty.pk).ssh_private_key == ""
    assert "total: 0 re-encrypted, 3 already current" in rotate()  # running it again is a no-op


def test_a_value_no_key_decrypts_is_reported_and_the_rest_is_rotated(settings):
    settings.FIELD_ENCRYPTION_KEY = KEY_C
    lost = make_host("lost")
    settings.FIELD_ENCRYPTION_KEY = KEY_A
    kept = make_host("kept")
    lost_token = stored(lost)
    settings.FIELD_ENCRYPTION_KEY = f"{KEY_B},{KEY_A}"
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 value"):
        call_command("rotate_encryption_keys", stdout=out)
    assert "1 re-encrypted, 0 already under the first key, 1 undecryptable" in out.getvalue()
    assert stored(lost) == lost_token  # left as it was
    settings.FIELD_ENCRYPTION_KEY = KEY_B
    assert Host.objects.get(pk=kept.pk).ssh_private_key == PEM
