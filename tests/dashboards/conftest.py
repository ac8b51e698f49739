"""Fixtures of the staff dashboard's tests: the control-plane tests' settings isolation and
recorded tasks (tests/platform/conftest.py), and the browser fixtures of tests/browser.py (a
browser test module imports only its helpers; each starts its own browser)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

import django  # noqa: E402

django.setup()

from tests import browser as browser_fixtures  # noqa: E402
from tests.platform import conftest as platform_fixtures  # noqa: E402

_isolated_settings = platform_fixtures._isolated_settings
queued = platform_fixtures.queued
orm_beside_playwright = browser_fixtures.orm_beside_playwright
browser = browser_fixtures.browser
console = browser_fixtures.console
visitor = browser_fixtures.visitor
