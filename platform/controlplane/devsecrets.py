"""Development secrets: generated once under var/secrets/ (0700, files 0600), never in the repo.

The run command (controlplane.stack) calls ensure_dev_secrets() and hands the files to its
processes as SECRET_KEY_FILE and FIELD_ENCRYPTION_KEY_FILE, so they run with DEBUG=false like
production does; settings only generate them by themselves when DEBUG=true. Production sets its
own secrets (settings refuse to start without them). Standard library only: settings import it.
"""

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

SECRETS = ("SECRET_KEY", "FIELD_ENCRYPTION_KEY")


def dev_secret_path(secrets_dir: Path, name: str) -> Path:
    """The file of one generated secret, created (48 random bytes, urlsafe) when missing."""
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = secrets_dir / name.lower()
    if path.exists():
        return path
    # Written in full under a temporary name, then linked into place: a process starting at the
    # same moment sees either no file or the whole secret, and only one secret ever wins.
    fd, tmp = tempfile.mkstemp(dir=secrets_dir, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))  # 64 characters: enough for the deploy check
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path


def ensure_dev_secrets(var_dir: Path) -> dict[str, str]:
    """Environment variables naming this var dir's secret files, e.g. {"SECRET_KEY_FILE": ...}."""
    secrets_dir = Path(var_dir) / "secrets"
    return {f"{name}_FILE": str(dev_secret_path(secrets_dir, name)) for name in SECRETS}
