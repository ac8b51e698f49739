"""Where the node wheel comes from: the newest WHEEL_DIR/vtpu-*.whl, built from this repo if
there is none (1-2 minutes, once; a file lock keeps two workers from building it together)."""

import fcntl
import hashlib
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from django.conf import settings

BUILD_TIMEOUT_SECONDS = 1200


class WheelBuildError(RuntimeError):
    pass


def _newest_wheel(wheel_dir: Path) -> Path | None:
    wheels = sorted(wheel_dir.glob("vtpu-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def node_wheel_path() -> Path:
    """The wheel nodes receive (Django, Celery and Ansible never land on a node)."""
    wheel_dir = Path(settings.WHEEL_DIR)
    found = _newest_wheel(wheel_dir) if wheel_dir.is_dir() else None
    if found:
        return found
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with open(wheel_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _newest_wheel(wheel_dir)  # another process may have built it while we waited
        if found:
            return found
        build = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "-q",
                "-w",
                str(wheel_dir),
                str(settings.BASE_DIR),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
        )
        found = _newest_wheel(wheel_dir)
        if build.returncode != 0 or found is None:
            raise WheelBuildError(
                f"Building the node wheel into {wheel_dir} failed (exit {build.returncode}): "
                f"{build.stderr[-2000:]}"
            )
        return found


def node_wheel_sha256() -> str:
    """Hex sha256 of the node wheel, which the install script checks its download against."""
    path = node_wheel_path()
    stat = path.stat()
    return _sha256_of(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    # Keyed by mtime and size too: a wheel rebuilt under the same name is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
