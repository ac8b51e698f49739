"""API tokens: hashed at rest, compared in constant time, revoked tokens refused."""

import hashlib

import pytest
from rest_framework.test import APIClient

from accounts import authentication
from accounts.models import ApiToken
from accounts.services import token_create as _token_create
from accounts.services import token_revoke


def token_create(*, user, name):
    return _token_create(account=user.membership.account, user=user, name=name)


pytestmark = pytest.mark.django_db


def test_it_stores_only_the_hash_of_the_secret(alice):
    created = token_create(user=alice, name="ci")
    row = ApiToken.objects.get(pk=created.token.pk)
    assert created.secret.startswith("vtpu_")
    assert row.sha256 == hashlib.sha256(created.secret.encode()).hexdigest()
    assert created.secret not in str(ApiToken.objects.filter(pk=row.pk).values().get())
    assert created.secret[5:13] == row.prefix


def test_a_valid_token_authenticates_with_a_constant_time_compare(alice, monkeypatch):
    compared = []
    real = authentication.hmac.compare_digest
    monkeypatch.setattr(
        authentication.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_create(user=alice, name='x').secret}")
    assert client.get("/api/v1/nodes").status_code == 200
    assert compared


@pytest.mark.parametrize(
    "header", [None, "Bearer vtpu_not-a-real-token", "Bearer something-else", "Bearer "]
)
def test_unauthenticated_or_unknown_tokens_get_401(db, header):
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    reply = client.get("/api/v1/nodes")
    assert reply.status_code == 401
    assert reply.json()["detail"]


def test_a_revoked_token_is_refused(alice):
    created = token_create(user=alice, name="old")
    token_revoke(token=created.token)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.secret}")
    reply = client.get("/api/v1/nodes")
    assert reply.status_code == 401
    assert "revoked" in reply.json()["detail"]


def test_last_used_is_recorded(alice):
    created = token_create(user=alice, name="x")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {created.secret}")
    client.get("/api/v1/nodes")
    created.token.refresh_from_db()
    assert created.token.last_used_at is not None
