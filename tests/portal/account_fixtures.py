"""Fixtures and helpers of the account pages' tests (tests/portal/test_account*.py): a member
of alice's account who is not its owner, and the links our mails carry."""

import re

import pytest

from tests.platform.conftest import account

LINK = re.compile(r"https?://\S+")


def link_in(message) -> str:
    """The one link of a mail (an invitation's, a password reset's)."""
    (link,) = LINK.findall(message.body)
    return link


def path_of(link: str) -> str:
    return "/" + link.split("://", 1)[1].split("/", 1)[1]


@pytest.fixture
def carol(alice):
    """A member of alice's account, not its owner."""
    from django.contrib.auth import get_user_model

    from accounts.services import member_add

    user = get_user_model().objects.create_user("carol", "carol@example.com", "pw-carol")
    member_add(account=account(alice), user=user)
    return user


@pytest.fixture
def carol_web(carol):
    from django.test import Client

    client = Client()
    client.force_login(carol)
    return client
