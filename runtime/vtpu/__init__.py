"""vTPU: a software-defined AI accelerator for commodity x86-64 servers.

SIW programs (siw.py) run on sentrons (sentron.py) over tensors in the node's arena, using the
Cython kernels (kernels/); the Phext Page Table (ppt/) maps phext coordinates to arena pages;
telemetry.py reports what was measured and where it came from; agent.py serves it over HTTP.
"""

__version__ = "0.1.0"

import os as _os

# Our OpenMP kernels and BLAS's own thread pool share the cores. GNU OpenMP's default is to
# spin-wait after each parallel region, which starves the BLAS threads that run next: measured
# here, it halved the MLP block and the encoder layer. Passive waiting must be set before
# libgomp loads (it does so with the first kernel module); an explicit setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
