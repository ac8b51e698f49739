"""Fixtures of the portal's tests: the control-plane tests' customers (alice, bob), local host,
isolated settings and recorded tasks (tests/platform/conftest.py), signed-in browser-less
clients, billing against the session's local Stripe server where a test asks for it, and the
browser fixtures of tests/browser.py (a browser test module imports only its helpers)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402
import pytest  # noqa: E402

django.setup()

from tests import browser as browser_fixtures  # noqa: E402
from tests.platform import conftest as platform_fixtures  # noqa: E402

# The control-plane tests' fixtures, and the browser's (each browser test module starts its own).
_isolated_settings = platform_fixtures._isolated_settings
queued = platform_fixtures.queued
alice = platform_fixtures.alice
bob = platform_fixtures.bob
local_host = platform_fixtures.local_host
orm_beside_playwright = browser_fixtures.orm_beside_playwright
browser = browser_fixtures.browser
console = browser_fixtures.console
visitor = browser_fixtures.visitor


@pytest.fixture
def alice_web(client, alice):
    """A browser-less client signed in as alice (the session cookie, as the sign-in page)."""
    client.force_login(alice)
    return client


@pytest.fixture
def bob_web(bob):
    from django.test import Client

    client = Client()
    client.force_login(bob)
    return client


@pytest.fixture
def stripe_on(settings, localstripe):
    """Billing on, against the session's local Stripe server, with the default plan mirrored
    there; billing's tasks sent by name run in-process (provisioning jobs are only recorded)."""
    from billing.services import plan_default_ensure, plan_sync
    from tests.conftest import use_stripe

    use_stripe(settings, localstripe)
    return plan_sync(plan=plan_default_ensure())
