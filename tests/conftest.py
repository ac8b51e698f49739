import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# platform/ is a source root (see manage.py); its apps import as top-level modules.
sys.path.append(str(REPO / "platform"))


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
