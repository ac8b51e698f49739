import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
# platform/ is a source root (see manage.py); its apps import as top-level modules.
sys.path.append(str(REPO / "platform"))

# The control plane refuses to start without its secrets (DEBUG is false in tests, as in
# production): the tests use development secrets generated once under var/, as the run command
# does, unless the environment brings its own.
if not any(os.environ.get(k) for k in ("SECRET_KEY", "SECRET_KEY_FILE")):
    from controlplane.devsecrets import ensure_dev_secrets

    for _name, _path in ensure_dev_secrets(
        Path(os.environ.get("VTPU_VAR_DIR", REPO / "var"))
    ).items():
        os.environ.setdefault(_name, _path)


@pytest.fixture(scope="session")
def node_wheel(tmp_path_factory) -> Path:
    """The node wheel built from this checkout, once per test session (what nodes receive)."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("vtpu-*.whl")
    return path


@pytest.fixture
def ssh_host(tmp_path_factory):
    """A second host reached over SSH: sshd in a network namespace of the test's own
    (tests/provisioning/netns.py); skipped, with the reason, where that is impossible."""
    from tests.provisioning import netns

    workdir = tmp_path_factory.mktemp("sshhost")
    try:
        host = netns.start(workdir)
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"no SSH test host: {exc}")
    try:
        yield host
    finally:
        netns.stop(host.namespace, host.sshd)


# ---- a real local Stripe API server -------------------------------------------------------------

STRIPE_SECRET_KEY = "sk_test_vtpu"
STRIPE_PUBLISHABLE_KEY = "pk_test_vtpu"
STRIPE_WEBHOOK_SECRET = "whsec_vtpu_tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory):
    """The base URL of a localstripe server of this session (../shared/STRIPE.md), started with
    --from-scratch (it never reads the state file another run may be writing) and always
    stopped."""
    executable = Path(sys.executable).with_name("localstripe")
    if not executable.exists():
        pytest.fail(f"{executable} is missing: install the dev extra (localstripe)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(executable), "--port", str(port), "--from-scratch"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{base}/v1/customers", auth=(STRIPE_SECRET_KEY, ""), timeout=2)
                break
            except requests.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"localstripe did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def use_stripe(settings, base: str) -> None:
    """Point billing at the local Stripe server (Django's `settings` fixture)."""
    settings.STRIPE_SECRET_KEY = STRIPE_SECRET_KEY
    settings.STRIPE_PUBLISHABLE_KEY = STRIPE_PUBLISHABLE_KEY
    settings.STRIPE_WEBHOOK_SECRET = STRIPE_WEBHOOK_SECRET
    settings.STRIPE_API_BASE = base
    settings.STRIPE_JS_URL = f"{base}/js.stripe.com/v3/"
    settings.STRIPE_MAX_NETWORK_RETRIES = 0  # a 500 is an answer here, not a reason to resend


def give_card(account, number: str = "4242424242424242"):
    """Save a test card as `account`'s default the way the card form does, minus the browser: a
    SetupIntent confirmed with the card (server-side here, Stripe.js there), then saved through
    billing.services.payment_method_save. Returns the BillingCustomer; a declined card raises
    stripe.CardError."""
    from billing import services
    from billing.stripe_client import stripe_client

    client = stripe_client()
    intent = services.setup_intent_create(account=account)
    method = client.v1.payment_methods.create(
        params={
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
        }
    )
    client.v1.setup_intents.confirm(intent.id, params={"payment_method": method.id})
    return services.payment_method_save(account=account, setup_intent_id=intent.id)
