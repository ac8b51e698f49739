"""The STRIPE_* settings are read strictly (controlplane/settings.py): secrets from the variable
or its _FILE, a tolerance that is a real check, an API base that is a URL."""

import json
import os
import secrets
import subprocess
import sys

from tests.conftest import REPO

NAMES = ["STRIPE_SECRET_KEY", "STRIPE_PUBLISHABLE_KEY", "STRIPE_WEBHOOK_SECRET",
         "STRIPE_API_BASE", "STRIPE_WEBHOOK_TOLERANCE_SECONDS", "STRIPE_MAX_NETWORK_RETRIES"]  # fmt: skip


def settings_with(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    code = (
        "import json, controlplane.settings as s;"
        f"print(json.dumps({{n: getattr(s, n) for n in {NAMES!r}}}))"
    )
    clean = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO / "platform"),
        "VTPU_VAR_DIR": str(tmp_path / "var"),
        "SECRET_KEY": secrets.token_urlsafe(48),
        "FIELD_ENCRYPTION_KEY": secrets.token_urlsafe(48),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60
    )


def test_stripe_settings_defaults_files_and_refusals(tmp_path):
    off = settings_with({}, tmp_path)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout) == {
        "STRIPE_SECRET_KEY": "",
        "STRIPE_PUBLISHABLE_KEY": "",
        "STRIPE_WEBHOOK_SECRET": "",
        "STRIPE_API_BASE": "",
        "STRIPE_WEBHOOK_TOLERANCE_SECONDS": 300,
        "STRIPE_MAX_NETWORK_RETRIES": 2,
    }
    key_file = tmp_path / "stripe_key"
    key_file.write_text("sk_test_from_file\n")
    on = settings_with(
        {
            "STRIPE_SECRET_KEY_FILE": str(key_file),
            "STRIPE_WEBHOOK_SECRET": "whsec_x",
            "STRIPE_API_BASE": "http://127.0.0.1:8420/",
        },
        tmp_path,
    )
    assert on.returncode == 0, on.stderr
    shown = json.loads(on.stdout)
    assert shown["STRIPE_SECRET_KEY"] == "sk_test_from_file"
    assert shown["STRIPE_API_BASE"] == "http://127.0.0.1:8420"
    for env, reason in [
        ({"STRIPE_WEBHOOK_TOLERANCE_SECONDS": "0"}, "more than 0"),
        ({"STRIPE_WEBHOOK_TOLERANCE_SECONDS": "5m"}, "must be an integer"),
        ({"STRIPE_API_BASE": "localhost:8420"}, "http:// or https://"),
        ({"STRIPE_SECRET_KEY": "pk_test_x"}, "publishable key"),
        ({"STRIPE_WEBHOOK_SECRET_FILE": str(tmp_path / "missing")}, "cannot read it"),
    ]:
        refused = settings_with(env, tmp_path)
        assert refused.returncode != 0 and reason in refused.stderr, (env, refused.stderr)
