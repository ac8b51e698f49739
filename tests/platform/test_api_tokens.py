"""/api/v1/tokens: the secret shown once; a customer only touches their own tokens."""

import pytest

from accounts.models import ApiToken

pytestmark = pytest.mark.django_db


def test_creating_a_token_shows_the_secret_once(alice_api):
    reply = alice_api.post("/api/v1/tokens", {"name": "laptop"}, format="json")
    assert reply.status_code == 201
    body = reply.json()
    assert body["token"].startswith("vtpu_") and body["name"] == "laptop"
    listed = alice_api.get("/api/v1/tokens").json()["results"]
    assert {t["name"] for t in listed} == {"tests", "laptop"}
    assert all("token" not in t for t in listed)


def test_a_token_needs_a_name(alice_api):
    reply = alice_api.post("/api/v1/tokens", {}, format="json")
    assert reply.status_code == 400
    assert "name" in reply.json()


def test_revoking_a_token_stops_it(alice_api):
    body = alice_api.post("/api/v1/tokens", {"name": "tmp"}, format="json").json()
    assert alice_api.delete(f"/api/v1/tokens/{body['id']}").status_code == 204
    assert ApiToken.objects.get(pk=body["id"]).revoked_at is not None
    alice_api.credentials(HTTP_AUTHORIZATION=f"Bearer {body['token']}")
    assert alice_api.get("/api/v1/tokens").status_code == 401


def test_bob_cannot_see_or_revoke_alices_tokens(alice_api, bob_api, alice):
    token = ApiToken.objects.filter(user=alice).first()
    assert bob_api.delete(f"/api/v1/tokens/{token.pk}").status_code == 404
    assert all(t["id"] != token.pk for t in bob_api.get("/api/v1/tokens").json()["results"])
    token.refresh_from_db()
    assert token.revoked_at is None
