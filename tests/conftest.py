import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# platform/ is a source root (see manage.py); its apps import as top-level modules.
sys.path.append(str(REPO / "platform"))

# The control plane refuses to start without its secrets (DEBUG is false in tests, as in
# production): the tests use development secrets generated once under var/, as the run command
# does, unless the environment brings its own.
if not any(os.environ.get(k) for k in ("SECRET_KEY", "SECRET_KEY_FILE")):
    from controlplane.devsecrets import ensure_dev_secrets

    for _name, _path in ensure_dev_secrets(
        Path(os.environ.get("VTPU_VAR_DIR", REPO / "var"))
    ).items():
        os.environ.setdefault(_name, _path)


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


@pytest.fixture
def ssh_host(tmp_path_factory):
    """A second host reached over SSH: sshd in a network namespace of the test's own
    (tests/provisioning/netns.py); skipped, with the reason, where that is impossible."""
    from tests.provisioning import netns

    workdir = tmp_path_factory.mktemp("sshhost")
    try:
        host = netns.start(workdir)
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"no SSH test host: {exc}")
    try:
        yield host
    finally:
        netns.stop(host.namespace, host.sshd)
