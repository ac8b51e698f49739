"""Add a host to the operator's pool: this machine (--local) or one reached over SSH, whose
host key is recorded now and pinned for every later connection."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from fleet.models import Host
from fleet.services.errors import FleetError
from fleet.services.nodes import host_check
from provisioning.runner import HostKeyUnavailable, scan_host_keys


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
        parser.add_argument(
            "--known-hosts-file",
            help="the host's SSH host keys (known_hosts lines) instead of reading them now with"
            " ssh-keyscan; e.g. from a trusted channel",
        )
        parser.add_argument("--python", default="python3", help="interpreter on the host")
        parser.add_argument("--base-dir", default="", help="where node directories go")
        parser.add_argument(
            "--agent-host",
            help="address agents bind to and are checked at (default: 127.0.0.1 for --local, the"
            " SSH address for --ssh)",
        )
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
        agent_host = o["agent_host"] or (o["ssh"] if o["ssh"] else "127.0.0.1")
        try:
            host_check(
                kind=Host.Kind.SSH if o["ssh"] else Host.Kind.LOCAL,
                address=o["ssh"] or "",
                agent_host=agent_host,
            )
        except FleetError as exc:
            raise CommandError(exc.message) from None
        known_hosts = ""
        if o["ssh"]:
            known_hosts = self.host_keys(o["ssh"], o["ssh_port"], o["known_hosts_file"])
        elif o["known_hosts_file"]:
            raise CommandError("--known-hosts-file is for an --ssh host")
        host, created = Host.objects.update_or_create(
            name=o["name"],
            defaults={
                "kind": Host.Kind.LOCAL if o["local"] else Host.Kind.SSH,
                "address": o["ssh"] or "",
                "ssh_user": o["ssh_user"] if o["ssh"] else "",
                "ssh_port": o["ssh_port"],
                "ssh_private_key": key,
                "ssh_known_hosts": known_hosts,
                "python": o["python"],
                "base_dir": o["base_dir"],
                "agent_host": agent_host,
                "port_range_start": start,
                "port_range_end": end,
                "capacity": o["capacity"],
                "tdp_watts": o["tdp_watts"],
                "is_active": not o["inactive"],
            },
        )
        verb = "created" if created else "updated"
        self.stdout.write(f"{verb}: host {host.name} ({host.kind}) id={host.pk}")
        if known_hosts:
            self.stdout.write(f"pinned SSH host keys of {host.address}:\n{known_hosts.rstrip()}")

    def host_keys(self, address: str, port: int, known_hosts_file: str | None) -> str:
        """Known_hosts lines for the host: from the file given, else read from it now."""
        if known_hosts_file:
            path = Path(known_hosts_file)
            if not path.is_file():
                raise CommandError(f"--known-hosts-file {path}: no such file")
            lines = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
            if not lines:
                raise CommandError(f"--known-hosts-file {path} holds no host key")
            return "\n".join(lines) + "\n"
        try:
            return scan_host_keys(address, port)
        except HostKeyUnavailable as exc:
            raise CommandError(
                f"host not added: its SSH host key could not be recorded: {exc}. Nodes are only"
                " provisioned on a host whose key is known; fix the connection, or give the key"
                " with --known-hosts-file."
            ) from None
