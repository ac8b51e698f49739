"""`python -m vtpu ...` is the `vtpu` command."""

import sys

from vtpu.cli import main

sys.exit(main())
