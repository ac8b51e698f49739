"""Control-plane settings. Every value is read from the environment once, here, strictly.

Embedded defaults start with no configuration at all: SQLite and secrets under var/ (created
0700, secrets 0600, never in the repository), Redis on localhost. Production sets DATABASE_URL,
REDIS_URL, SECRET_KEY (or SECRET_KEY_FILE), FIELD_ENCRYPTION_KEY (or _FILE) and ALLOWED_HOSTS.
"""

import os
import secrets
import sys
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent.parent  # the repository
if str(BASE_DIR) not in sys.path:  # provisioning/ (the Ansible runner) imports from the root
    sys.path.append(str(BASE_DIR))


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw not in ("true", "false"):
        raise RuntimeError(f"{name} must be 'true' or 'false', not {raw!r}")
    return raw == "true"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"{name} must be an integer, not {raw!r}") from None


def env_secret(name: str, *, generate_in: Path | None = None) -> str:
    """A secret from NAME, or the file named by NAME_FILE, or (development) a file under var/
    generated once with 0600 permissions, so restarts keep sessions and encrypted fields."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    value = os.environ.get(name)
    if value:
        return value
    if generate_in is None:
        raise RuntimeError(f"{name} (or {name}_FILE) must be set")
    generate_in.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret_path = generate_in / name.lower()
    if not secret_path.exists():
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return secret_path.read_text().strip()


VAR_DIR = Path(os.environ.get("VTPU_VAR_DIR", BASE_DIR / "var"))
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_secret("SECRET_KEY", generate_in=VAR_DIR / "secrets")
# Fernet key material for SSH keys and node tokens at rest (derived to a Fernet key in fleet).
FIELD_ENCRYPTION_KEY = env_secret("FIELD_ENCRYPTION_KEY", generate_in=VAR_DIR / "secrets")
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h]
# The address agents and customers use to reach this control plane (heartbeats, enrollment).
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "controlplane",  # operator commands: create_customer, create_host, bootstrap_demo
    "accounts",
    "fleet",
    "api",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "controlplane.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
WSGI_APPLICATION = "controlplane.wsgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'controlplane.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web, worker and beat write to one SQLite file: wait for the lock instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"  # collectstatic fills it; WhiteNoise serves it
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
LOGIN_URL = "/admin/login/"

# ---- Celery over Redis ----------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None  # results live in the database (jobs, events), not in Redis
CELERY_TASK_ACKS_LATE = True  # a task whose worker dies is delivered again...
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # ...and its service decides what that means
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 3600)}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# ---- provisioning ---------------------------------------------------------------------------
PROVISIONING_DIR = BASE_DIR / "provisioning"
PROVISIONING_JOB_TIMEOUT = env_int("PROVISIONING_JOB_TIMEOUT", 900)  # seconds
PROVISIONING_IDLE_TIMEOUT = env_int("PROVISIONING_IDLE_TIMEOUT", 300)
NODES_DIR = Path(os.environ.get("VTPU_NODES_DIR", VAR_DIR / "nodes"))  # local nodes live here
WHEEL_DIR = Path(os.environ.get("VTPU_WHEEL_DIR", VAR_DIR / "wheels"))
HEARTBEAT_SECONDS = env_int("HEARTBEAT_SECONDS", 15)
ENROLLMENT_TTL_SECONDS = env_int("ENROLLMENT_TTL_SECONDS", 3600)

# ---- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "vTPU Cloud API",
    "DESCRIPTION": "Nodes, provisioning jobs and API tokens of a vTPU Cloud account.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_NAME_OVERRIDES": {
        "NodeStateEnum": "fleet.models.NodeState",
        "JobStateEnum": "fleet.models.JobState",
        "NodeKindEnum": "fleet.models.Node.Kind",
        "JobKindEnum": "fleet.models.ProvisioningJob.Kind",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
