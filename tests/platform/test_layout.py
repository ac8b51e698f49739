"""platform/ holds the control plane but must never shadow the stdlib `platform` module."""

import subprocess
import sys

from tests.conftest import REPO


def test_stdlib_platform_and_controlplane_import_side_by_side():
    import platform

    import controlplane.settings

    assert platform.__file__.startswith(sys.base_prefix), platform.__file__
    assert callable(platform.machine) and platform.python_version().startswith("3.")
    assert controlplane.settings.ROOT_URLCONF == "controlplane.urls"


def test_manage_py_runs_with_the_stdlib_platform_module():
    # manage.py puts platform/ on sys.path first; a module named `platform` there would win.
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", "import platform; print(platform.__file__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith(sys.base_prefix), out.stdout
    check = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "System check identified no issues" in check.stdout, check.stderr
