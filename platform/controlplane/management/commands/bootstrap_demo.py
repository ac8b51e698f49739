"""The run command's demo: an admin, a demo customer with a token, this machine as a host, and
a demo node provisioned on it through the real Ansible path. Safe to run at every start."""

import os
import secrets
import subprocess
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from accounts import selectors as account_selectors
from accounts.models import ApiToken
from accounts.services import account_create, account_set_quota, token_create, token_revoke
from fleet.models import Host, Node, NodeState
from fleet.services.nodes import node_request, node_retry
from fleet.wheel import node_wheel_path
from monitoring.models import AlertChannel

DEMO_NODE = "demo-node"
RUN_TOKEN = "run command"


def _user(username: str, *, staff: bool) -> tuple[object, str | None]:
    """The user, and a new password when it had none (printed once; kept in var/secrets)."""
    user, _ = get_user_model().objects.get_or_create(username=username)
    password_file = settings.VAR_DIR / "secrets" / f"{username}_password"
    password = None
    if not password_file.exists() or not user.has_usable_password():
        password = secrets.token_urlsafe(12)
        user.set_password(password)
        password_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        password_file.write_text(password)
        password_file.chmod(0o600)
    user.is_staff = user.is_superuser = staff
    user.save()
    return user, password or password_file.read_text()


def _restart_local_agent(node: Node) -> bool:
    """Start a local node's agent again the way its role does (the run command stops local
    agents on Ctrl-C); False when it is already running or was never deployed."""
    node_dir = Path(node.node_dir)
    script = node_dir / "run-agent.sh"
    if not script.exists():
        return False
    try:
        os.kill(int((node_dir / "agent.pid").read_text().split()[0]), 0)
        return False  # alive
    except (OSError, ValueError):
        pass
    with open(node_dir / "agent.log", "ab") as log:
        subprocess.Popen(
            ["./run-agent.sh"],
            cwd=node_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return True


class Command(BaseCommand):
    help = "Create the demo admin, customer, local host and node (idempotent)."

    def handle(self, *args, **options) -> None:
        out = self.stdout.write
        admin, admin_password = _user("admin", staff=True)
        demo, demo_password = _user("demo", staff=False)
        account = account_selectors.account_of_user(user=demo) or account_create(
            name="Demo", owner=demo
        )
        if account.node_quota < 10:  # room to try more nodes than the default quota
            account_set_quota(account=account, node_quota=10)
        # One live token for the demo at a time: each start prints a fresh one.
        for stale in ApiToken.objects.filter(user=demo, name=RUN_TOKEN, revoked_at__isnull=True):
            token_revoke(token=stale)
        token = token_create(account=account, user=demo, name=RUN_TOKEN).secret
        host, _ = Host.objects.get_or_create(
            name="this-machine",
            defaults={"kind": Host.Kind.LOCAL, "agent_host": "127.0.0.1", "python": "python3"},
        )
        out("==> building the node wheel (first start only)")
        out(f"    {node_wheel_path()}")
        node = (
            Node.objects.filter(account=account, name=DEMO_NODE)
            .exclude(state=NodeState.TERMINATED)
            .first()
        )
        if node is None:
            node = node_request(account=account, user=demo, name=DEMO_NODE, host=None).node
            out(f"==> demo node {node.id} requested: Ansible provisions it now")
        elif node.state == NodeState.FAILED and node.delete_requested_at is None:
            node_retry(node=node)
            out(f"==> demo node {node.id} had failed: provisioning it again")
        # Every node this machine hosts gets its agent back (the run command stopped them all).
        for hosted in Node.objects.filter(
            host__kind=Host.Kind.LOCAL,
            state__in=[NodeState.READY, NodeState.DEGRADED, NodeState.SUSPENDED],
        ):
            if _restart_local_agent(hosted):
                out(f"==> node {hosted.name} ({hosted.id}): agent started again")
        # Alerts of the whole fleet to staff, and the demo's own to its customer: as mails,
        # which the run command writes to var/mail/ (no SMTP host).
        AlertChannel.objects.get_or_create(
            account=None,
            kind=AlertChannel.Kind.EMAIL,
            defaults={"name": "operators", "target": "ops@localhost"},
        )
        AlertChannel.objects.get_or_create(
            account=account,
            kind=AlertChannel.Kind.EMAIL,
            defaults={"name": "demo", "target": "demo@localhost"},
        )
        url = settings.PUBLIC_URL
        out("")
        out(f"  portal            {url}/    user demo  password {demo_password}")
        out(f"  staff dashboard   {url}/staff/    user admin  password {admin_password}")
        out(f"  admin (staff)     {url}/admin/    user admin  password {admin_password}")
        out(f"  demo API token    {token}")
        out(f"  API               {url}/api/v1/nodes   (Authorization: Bearer <token>)")
        out(f"  OpenAPI schema    {url}/api/v1/schema/")
        if settings.METRICS_TOKEN:
            out(
                f"  Prometheus        {url}/metrics   (Authorization: Bearer {settings.METRICS_TOKEN})"
            )
            out(
                "  Prometheus config dashboards/prometheus/prometheus.yml (platform + agents via"
                " http_sd; see its README.md)"
            )
        if settings.STRIPE_API_BASE:
            out(
                f"  billing           test mode (local Stripe at {settings.STRIPE_API_BASE}):"
                f" add a card at {url}/billing/card (4242 4242 4242 4242), then deploy at"
                f" {url}/nodes/new/"
            )
        elif settings.STRIPE_SECRET_KEY:
            out(f"  billing           Stripe; cards at {url}/billing/card")
        else:
            out("  billing           off (no STRIPE_SECRET_KEY): every node is free")
        if not settings.EMAIL_HOST:
            out(f"  alert mails       {settings.EMAIL_FILE_PATH}/")
        out(f"  watch the node    curl -H 'Authorization: Bearer {token}' {url}/api/v1/nodes")
        # The schedule benchmarks a new node within a minute of it being ready, then hourly.
        out(
            f"  its benchmarks    curl -H 'Authorization: Bearer {token}'"
            f" {url}/api/v1/nodes/{node.id}/benchmarks"
        )
        out("")
