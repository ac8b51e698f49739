"""Add a host to the operator's pool: this machine (--local) or one reached over SSH."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from fleet.models import Host


class Command(BaseCommand):
    help = "Add or update a host in the pool nodes are provisioned onto."

    def add_arguments(self, parser):
        parser.add_argument("name")
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--local", action="store_true", help="this machine (connection: local)")
        kind.add_argument("--ssh", metavar="ADDRESS", help="a host reached over SSH")
        parser.add_argument("--ssh-user", default="root")
        parser.add_argument("--ssh-port", type=int, default=22)
        parser.add_argument("--ssh-key-file", help="private key (PEM); stored encrypted")
        parser.add_argument("--python", default="python3", help="interpreter on the host")
        parser.add_argument("--base-dir", default="", help="where node directories go")
        parser.add_argument("--agent-host", default="127.0.0.1", help="address agents bind to")
        parser.add_argument("--ports", default="18000-18999", help="agent port range")
        parser.add_argument("--capacity", type=int, default=4)
        parser.add_argument("--tdp-watts", type=float, default=65.0)
        parser.add_argument(
            "--inactive", action="store_true", help="only staff-pinned nodes go here (maintenance)"
        )

    def handle(self, *args, **o) -> None:
        try:
            start, end = (int(p) for p in o["ports"].split("-"))
        except ValueError:
            raise CommandError("--ports must look like 18000-18999") from None
        if not 0 < start <= end < 65536:
            raise CommandError("--ports must be an ordered range within 1-65535")
        key = ""
        if o["ssh_key_file"]:
            path = Path(o["ssh_key_file"])
            if not path.is_file():
                raise CommandError(f"--ssh-key-file {path}: no such file")
            key = path.read_text()
        elif o["ssh"]:
            raise CommandError("an SSH host needs --ssh-key-file")
        host, created = Host.objects.update_or_create(
            name=o["name"],
            defaults={
                "kind": Host.Kind.LOCAL if o["local"] else Host.Kind.SSH,
                "address": o["ssh"] or "",
                "ssh_user": o["ssh_user"] if o["ssh"] else "",
                "ssh_port": o["ssh_port"],
                "ssh_private_key": key,
                "python": o["python"],
                "base_dir": o["base_dir"],
                "agent_host": o["agent_host"],
                "port_range_start": start,
                "port_range_end": end,
                "capacity": o["capacity"],
                "tdp_watts": o["tdp_watts"],
                "is_active": not o["inactive"],
            },
        )
        verb = "created" if created else "updated"
        self.stdout.write(f"{verb}: host {host.name} ({host.kind}) id={host.pk}")
