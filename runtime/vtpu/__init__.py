"""vTPU: a software-defined AI accelerator for commodity x86-64 servers.

SIW programs (siw.py) run on sentrons (sentron.py) over tensors in the node's arena, using the
Cython kernels (kernels/); the Phext Page Table (ppt/) maps phext coordinates to arena pages;
telemetry.py reports what was measured and where it came from; agent.py serves it over HTTP.
"""

__version__ = "0.1.0"
