"""Production settings: secrets are required, the documented environment passes Django's deploy
check, development stays on plain http, and enrollment secrets never reach a log line.

Settings are read once per process, so most tests run `manage.py` in a clean environment."""

from __future__ import annotations

import ast
import io
import logging
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from controlplane.devsecrets import ensure_dev_secrets

REPO = Path(__file__).resolve().parents[2]
ENROLL_SECRET = "Zq9-secret-from-an-enrollment-link"


def manage(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    clean = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "VTPU_VAR_DIR": str(tmp_path / "var"),
        **env,
    }
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def production_env() -> dict[str, str]:
    """The README's production example (secrets inline instead of in files)."""
    return {
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "FIELD_ENCRYPTION_KEY": secrets.token_urlsafe(48),
        "ALLOWED_HOSTS": "cloud.example.com",
        "PUBLIC_URL": "https://cloud.example.com",
        "NUM_PROXIES": "1",
    }


def show(tmp_path: Path, env: dict[str, str], *names: str) -> dict[str, str]:
    """repr() of the named settings, as a process with this environment sees them."""
    code = (
        "from django.conf import settings\n"
        f"print('SHOWN', repr({{n: repr(getattr(settings, n, None)) for n in {names!r}}}))"
    )
    done = manage("shell", "-c", code, env=env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("SHOWN ")]
    return ast.literal_eval(line.removeprefix("SHOWN "))


# ---- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["SECRET_KEY", "FIELD_ENCRYPTION_KEY"])
def test_without_a_secret_it_stops_and_says_what_to_set(tmp_path, missing):
    env = {k: v for k, v in production_env().items() if k != missing}
    done = manage("check", env=env, tmp_path=tmp_path)
    assert done.returncode != 0
    assert f"RuntimeError: {missing} is not set." in done.stderr
    assert f"{missing}_FILE" in done.stderr and "DEBUG=true" in done.stderr
    assert not (tmp_path / "var" / "secrets").exists()  # nothing generated behind our back


def test_a_secret_file_that_cannot_be_read_is_named(tmp_path):
    env = {**production_env(), "SECRET_KEY_FILE": str(tmp_path / "nope")}
    done = manage("check", env=env, tmp_path=tmp_path)
    assert done.returncode != 0
    assert f"SECRET_KEY_FILE={tmp_path / 'nope'}: cannot read it" in done.stderr


def test_the_run_commands_secret_files_are_private_and_stable(tmp_path):
    first = ensure_dev_secrets(tmp_path / "var")
    assert set(first) == {"SECRET_KEY_FILE", "FIELD_ENCRYPTION_KEY_FILE"}
    assert stat.S_IMODE((tmp_path / "var" / "secrets").stat().st_mode) == 0o700
    values = {}
    for path in first.values():
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        values[path] = Path(path).read_text()
        assert len(values[path]) >= 50
    assert ensure_dev_secrets(tmp_path / "var") == first
    assert {path: Path(path).read_text() for path in first.values()} == values
    assert [
        p.name for p in (tmp_path / "var" / "secrets").iterdir() if p.name.startswith(".")
    ] == []


def test_with_the_secret_files_it_starts(tmp_path):
    env = {"DEBUG": "false", **ensure_dev_secrets(tmp_path / "var")}
    done = manage("check", env=env, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no issues" in done.stdout


def test_debug_generates_missing_secrets_under_var(tmp_path):
    done = manage("check", env={"DEBUG": "true"}, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("secret_key", "field_encryption_key"):
        assert stat.S_IMODE((tmp_path / "var" / "secrets" / name).stat().st_mode) == 0o600


# ---- the deploy check, https, and what development keeps ----------------------------------------


def test_the_documented_production_environment_passes_the_deploy_check(tmp_path):
    done = manage(
        "check", "--deploy", "--fail-level", "WARNING", env=production_env(), tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues (0 silenced)." in done.stdout
    assert "WARNING" not in done.stdout + done.stderr


def test_production_is_https_throughout(tmp_path):
    shown = show(
        tmp_path,
        production_env(),
        "SECURE_SSL_REDIRECT",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_PROXY_SSL_HEADER",
        "CSRF_TRUSTED_ORIGINS",
        "SECURE_HSTS_SECONDS",
    )
    assert shown == {
        "SECURE_SSL_REDIRECT": "True",
        "SESSION_COOKIE_SECURE": "True",
        "CSRF_COOKIE_SECURE": "True",
        "SECURE_PROXY_SSL_HEADER": "('HTTP_X_FORWARDED_PROTO', 'https')",
        "CSRF_TRUSTED_ORIGINS": "['https://cloud.example.com']",
        "SECURE_HSTS_SECONDS": "31536000",
    }


def test_development_stays_on_plain_http(tmp_path):
    env = {"DEBUG": "false", **ensure_dev_secrets(tmp_path / "var")}
    shown = show(
        tmp_path,
        env,
        "SECURE_SSL_REDIRECT",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_PROXY_SSL_HEADER",
        "SECURE_HSTS_SECONDS",
        "CSRF_TRUSTED_ORIGINS",
    )
    assert shown == {
        "SECURE_SSL_REDIRECT": "False",
        "SESSION_COOKIE_SECURE": "False",
        "CSRF_COOKIE_SECURE": "False",
        "SECURE_PROXY_SSL_HEADER": "None",
        "SECURE_HSTS_SECONDS": "0",
        "CSRF_TRUSTED_ORIGINS": "['http://127.0.0.1:8000']",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HTTPS": "yes"}, "HTTPS must be 'true' or 'false', not 'yes'"),
        (
            {"HTTPS": "true", "PUBLIC_URL": "http://cloud.example.com"},
            "HTTPS=true but PUBLIC_URL is http://cloud.example.com",
        ),
        ({"PUBLIC_URL": "cloud.example.com"}, "PUBLIC_URL must be an http:// or https:// URL"),
        (
            {"CELERY_VISIBILITY_TIMEOUT": "30", "PROVISIONING_JOB_TIMEOUT": "600"},
            "CELERY_VISIBILITY_TIMEOUT=30 is too short: it must be longer than the longest task,"
            " a provisioning job's hard time limit of 780 s",
        ),
        (
            {"CELERY_VISIBILITY_TIMEOUT": "1080", "PROVISIONING_JOB_TIMEOUT": "900"},
            "CELERY_VISIBILITY_TIMEOUT=1080 is too short",
        ),
    ],
)
def test_inconsistent_settings_are_refused_with_the_reason(tmp_path, env, message):
    done = manage("check", env={**production_env(), **env}, tmp_path=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr


def test_a_visibility_timeout_longer_than_the_longest_job_is_accepted(tmp_path):
    env = {**production_env(), "CELERY_VISIBILITY_TIMEOUT": "1081"}
    assert show(tmp_path, env, "CELERY_BROKER_TRANSPORT_OPTIONS") == {
        "CELERY_BROKER_TRANSPORT_OPTIONS": "{'visibility_timeout': 1081}"
    }


def test_the_cache_is_redis_on_the_brokers_server_db_1(tmp_path):
    env = {**production_env(), "REDIS_URL": "redis://redis.internal:6380/0"}
    shown = show(tmp_path, env, "CACHES")
    assert "'BACKEND': 'django.core.cache.backends.redis.RedisCache'" in shown["CACHES"]
    assert "'LOCATION': 'redis://redis.internal:6380/1'" in shown["CACHES"]


# ---- no enrollment secret in a log ------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("logger_name", ["django.request", "django.server"])
def test_django_logs_show_no_enrollment_secret(logger_name):
    logger = logging.getLogger(logger_name)
    collect = Collect()
    logger.addHandler(collect)
    try:
        logger.warning("Not Found: %s", f"/enroll/{ENROLL_SECRET}/install.sh")
        logger.warning('"%s" %s %s', f"GET /enroll/{ENROLL_SECRET}/vtpu-0.1.0.whl HTTP/1.1", 200, 9)
        logger.warning("Not Found: %s", "/api/v1/enroll")  # the API path is left alone
    finally:
        logger.removeHandler(collect)
    assert collect.lines == [
        "Not Found: /enroll/<redacted>/install.sh",
        '"GET /enroll/<redacted>/vtpu-0.1.0.whl HTTP/1.1" 200 9',
        "Not Found: /api/v1/enroll",
    ]


def test_gunicorns_access_log_shows_no_enrollment_secret():
    from gunicorn.config import Config

    from controlplane.gunicorn_logging import RedactingLogger

    cfg = Config()
    cfg.set("accesslog", "-")
    cfg.set("access_log_format", '%(h)s "%(r)s" %(s)s "%(f)s" %(U)s %({raw_uri}e)s')
    logger = RedactingLogger(cfg)
    out = io.StringIO()
    for handler in logger.access_log.handlers:
        handler.setStream(out)
    path = f"/enroll/{ENROLL_SECRET}/install.sh"
    environ = {
        "REQUEST_METHOD": "GET",
        "RAW_URI": path,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.7",
        "HTTP_REFERER": f"https://cloud.example.com/enroll/{ENROLL_SECRET}/install.sh",
    }
    response = SimpleNamespace(status="200 OK", sent=1234, headers=[])
    request = SimpleNamespace(headers=[("REFERER", environ["HTTP_REFERER"])])
    logger.access(response, request, environ, SimpleNamespace(seconds=0, microseconds=1500))
    line = out.getvalue()
    assert ENROLL_SECRET not in line
    assert line.startswith('203.0.113.7 "GET /enroll/<redacted>/install.sh HTTP/1.1" 200'), line
    assert "https://cloud.example.com/enroll/<redacted>/install.sh" in line
    assert line.rstrip().endswith("/enroll/<redacted>/install.sh /enroll/<redacted>/install.sh")
