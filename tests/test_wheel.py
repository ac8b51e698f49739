"""The node wheel holds the `vtpu` package alone, compiled, and depends on nothing from the platform:
numpy and scipy for the kernels, Starlette, uvicorn and prometheus-client for the agent."""

import zipfile

import pytest

PLATFORM_ONLY = ("django", "celery", "stripe", "ansible", "redis", "psycopg", "torch")


@pytest.fixture(scope="module")
def wheel(node_wheel):
    return zipfile.ZipFile(node_wheel)


@pytest.mark.slow
def test_the_wheel_holds_only_the_vtpu_package_with_compiled_extensions(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist()}
    assert top_level == {"vtpu", next(t for t in top_level if t.endswith(".dist-info"))}
    names = wheel.namelist()
    assert any(n.startswith("vtpu/kernels/") and n.endswith(".so") for n in names), names
    assert not any(n.endswith((".pyx", ".c")) for n in names)


@pytest.mark.slow
def test_the_wheel_depends_on_numpy_scipy_and_the_agents_http_stack_only(wheel):
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in wheel.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split("==")[0] for r in requires) == [
        "numpy",
        "prometheus-client",
        "scipy",
        "starlette",
        "uvicorn",
    ]
    assert all("==" in r for r in requires), "runtime dependencies are pinned"
    assert not any(r.lower().startswith(PLATFORM_ONLY) for r in requires)
