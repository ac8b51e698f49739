#!/usr/bin/env python
"""Django's command-line utility for the vTPU Cloud control plane.

platform/ is a source root, not a package: its apps import as top-level modules (controlplane,
...), so nothing named `platform` ever shadows Python's standard library module.
"""

import os
import sys
from pathlib import Path

PLATFORM_DIR = Path(__file__).resolve().parent / "platform"


def main() -> None:
    sys.path.insert(0, str(PLATFORM_DIR))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
