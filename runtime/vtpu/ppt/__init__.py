"""The Phext Page Table (PPT): phext coordinates -> pages of the node's arena.

`coords` parses and prints phext coordinates exactly as the `phext` package does; `_ppt` holds
the page table and its set-associative translation cache (layout and reasons in its docstring):
pages map on first touch, or only through `map_many` / `unmap_many` (map_on_touch=False, as the
KV cache of vtpu.models.kvcache uses it);
`workloads` has the structured and random access patterns and `measure` for the benchmark.
Lookups and translation-cache hits are added to `vtpu.counters.COUNTERS` (ppt_lookups, ppt_hits):
batch calls add theirs at once, single lookups in groups of 256 (and on stats()/flush_counters()).
"""

from vtpu.ppt._ppt import PhextPageTable, PPTError
from vtpu.ppt.coords import (
    DIMENSIONS,
    Coordinate,
    CoordinateError,
    format_coordinate,
    from_array,
    parse_coordinate,
    to_array,
)
from vtpu.ppt.workloads import measure, random_pattern, structured_pattern

__all__ = [
    "DIMENSIONS",
    "Coordinate",
    "CoordinateError",
    "PPTError",
    "PhextPageTable",
    "format_coordinate",
    "from_array",
    "measure",
    "parse_coordinate",
    "random_pattern",
    "structured_pattern",
    "to_array",
]
