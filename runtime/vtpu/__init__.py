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
# ...but a sleeping thread costs ~55 us to wake, on every parallel region: a 0.6B LLM decode step
# makes 113 small matmuls, ~6 ms of a ~31 ms step. A short spin first (GNU OpenMP's spin count
# overrides PASSIVE) gave int8 decode +12-31 % at batch 1 and left the BLAS-mixed suite workloads
# (mlp_block, encoder_layer, minilm_encoder) within noise; 10x longer spins cost those 4-13 %.
_os.environ.setdefault("GOMP_SPINCOUNT", "3000")
# Likewise OpenBLAS's workers spin after each call, and a process here holds two OpenBLAS pools
# (numpy's and scipy's, whose BLAS our GEMM calls): the pool that just ran starves the other.
# A short timeout (2^4 cycles' worth of polling) halved GEMM 1024 and attention times in our
# interleaved benchmarks. Read when each OpenBLAS initialises, so this must precede numpy.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
