"""Builds the runtime's Cython extensions: every runtime/vtpu/**/*.pyx becomes one extension.

Compiler options are set once here. VTPU_CYTHON_DEBUG=1 turns bounds and wraparound checks back on
for debugging; VTPU_BUILD_ONLY=vtpu.kernels._dense,... builds just those modules (handy while
iterating on one kernel).
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
DEBUG = os.environ.get("VTPU_CYTHON_DEBUG", "0") == "1"
ONLY = {m for m in os.environ.get("VTPU_BUILD_ONLY", "").split(",") if m}

# Portable baseline: the wheel must run on any x86-64. Kernels that need AVX2/AVX-512/VNNI/AMX
# carry function-level target attributes and are chosen at run time from CPUID.
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-unused-function"]
LDFLAGS = ["-fopenmp"]


def extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((ROOT / "runtime").rglob("*.pyx")):
        rel = pyx.relative_to(ROOT / "runtime").with_suffix("")
        name = ".".join(rel.parts)
        if ONLY and name not in ONLY:
            continue
        exts.append(
            Extension(
                name,
                [str(pyx.relative_to(ROOT))],
                # the kernels live in headers beside the .pyx: a change there must rebuild it
                depends=[str(h.relative_to(ROOT)) for h in sorted(pyx.parent.glob("*.h"))],
                extra_compile_args=CFLAGS,
                extra_link_args=LDFLAGS,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": not DEBUG,
            "embedsignature": True,
        },
        quiet=True,
    )


setup(ext_modules=extensions())
