"""What the browser tests share: Debian's chromium driven by Playwright's sync API, a signed-in
page against pytest-django's live_server, and axe-core (vendored in tests/vendor, never served)
run inside the page. Import the fixtures into a test module (`from tests.browser import
browser, orm_beside_playwright, ...  # noqa: F401`).

Playwright's sync API keeps an asyncio loop running in this thread while it is started, and
Django refuses ORM calls from a thread with a running loop (SynchronousOnlyOperation), though
ours are plain synchronous calls: a module allows them while its browser is open, and starts its
browser per module, so no other test module runs beside that loop (tests/billing/
test_card_browser.py explains why pytest-playwright's session-wide browser is not used)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

CHROMIUM = "/usr/bin/chromium"
# Headless without a sandbox (the tests run as root); no background calls to Google's services,
# which this machine's closed network would refuse one by one.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
PHONE = {"width": 375, "height": 740}


@pytest.fixture(scope="module")
def orm_beside_playwright():
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(scope="module")
def browser(orm_beside_playwright):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console() -> list[str]:
    """What the visitor's page wrote to its console, script errors included."""
    return []


@pytest.fixture
def visitor(browser, live_server, console):
    """A browser page in a context of its own (no cookies yet)."""
    context = browser.new_context(base_url=live_server.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("console", lambda message: console.append(message.text))
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    yield page
    context.close()


def sign_in(page, user, live_server) -> None:
    """The user's session cookie in the browser, as the sign-in page would leave it."""
    client = Client()
    client.force_login(user)
    page.context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": live_server.url,
            }
        ]
    )


def script_errors(console: list[str]) -> list[str]:
    """Failed scripts and anything the page's Content-Security-Policy refused."""
    return [t for t in console if "Content Security Policy" in t or "page error" in t]


def axe_violations(page, impacts=("serious", "critical")) -> list[dict]:
    """axe-core's violations of the page as it is now, of these impacts: each rule's id, help
    text and the first offending nodes' selectors. axe is added by Playwright (not as a
    <script> of the page, which its policy would refuse): evaluated over the DevTools protocol."""
    if not AXE.exists():
        pytest.fail(f"{AXE} is missing (tests/vendor/README.md says where it comes from)")
    if not page.evaluate("() => typeof axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    results = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [
        {
            "id": v["id"],
            "impact": v["impact"],
            "help": v["help"],
            "nodes": [n["target"] for n in v["nodes"][:5]],
        }
        for v in results["violations"]
        if v["impact"] in impacts
    ]


def horizontal_overflow(page) -> int:
    """How many CSS pixels the page is wider than its viewport (0: no horizontal scroll)."""
    return page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
