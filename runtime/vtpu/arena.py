"""The sentron's memory: one 64-byte-aligned byte buffer, tensors are numpy views into it.

One buffer per sentron means a program's working set is bounded up front and never fragments the
process heap; 64-byte alignment keeps every tensor on its own cache lines (and AVX loads aligned).
The allocator is first-fit over a sorted free list, coalescing neighbours on free: programs
allocate a few large blocks, so a simple list beats anything cleverer.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

ALIGN = 64


class ArenaFull(MemoryError):
    """The arena cannot fit a request; the message says how much was asked and what is free."""


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < ALIGN:
            raise ValueError(f"arena capacity {capacity_bytes} is below {ALIGN} bytes")
        self.capacity = _round_up(int(capacity_bytes))
        # np.empty leaves pages untouched, so an arena costs memory only where tensors live.
        raw = np.empty(self.capacity + ALIGN, dtype=np.uint8)
        start = -raw.ctypes.data % ALIGN
        self.buffer = raw[start : start + self.capacity]
        self._base = self.buffer.ctypes.data
        self._free_offsets: list[int] = [0]  # sorted; parallel to _free_sizes
        self._free_sizes: list[int] = [self.capacity]
        self._blocks: dict[int, int] = {}  # offset -> size of each live allocation
        self.used = 0
        self.peak = 0

    # -- raw blocks -------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        """Reserve nbytes (rounded up to 64); returns the block's offset in the buffer."""
        size = _round_up(max(int(nbytes), 1))
        for j, free in enumerate(self._free_sizes):
            if free >= size:
                offset = self._free_offsets[j]
                if free == size:
                    del self._free_offsets[j], self._free_sizes[j]
                else:
                    self._free_offsets[j] += size
                    self._free_sizes[j] -= size
                self._blocks[offset] = size
                self.used += size
                self.peak = max(self.peak, self.used)
                return offset
        largest = max(self._free_sizes, default=0)
        raise ArenaFull(
            f"arena cannot fit {size} bytes: {self.capacity - self.used} of {self.capacity} are"
            f" free, the largest free block is {largest}; give the sentron a larger arena or free"
            " scratch tensors sooner"
        )

    def free(self, offset: int) -> None:
        size = self._blocks.pop(offset, None)
        if size is None:
            raise ValueError(f"arena offset {offset} is not a live allocation (freed twice?)")
        self.used -= size
        j = bisect.bisect_left(self._free_offsets, offset)
        self._free_offsets.insert(j, offset)
        self._free_sizes.insert(j, size)
        # Coalesce with the right neighbour, then the left one.
        if j + 1 < len(self._free_offsets) and offset + size == self._free_offsets[j + 1]:
            self._free_sizes[j] += self._free_sizes.pop(j + 1)
            del self._free_offsets[j + 1]
        if j > 0 and self._free_offsets[j - 1] + self._free_sizes[j - 1] == offset:
            self._free_sizes[j - 1] += self._free_sizes.pop(j)
            del self._free_offsets[j]

    # -- tensors ----------------------------------------------------------------------------

    def tensor(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A C-contiguous, 64-byte-aligned array of `shape` living in the arena (uninitialised)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        offset = self.alloc(nbytes)
        return self.buffer[offset : offset + nbytes].view(dtype).reshape(shape)

    def release(self, array: np.ndarray) -> None:
        """Give back the memory of an array returned by tensor()."""
        self.free(array.ctypes.data - self._base)

    def reset(self) -> None:
        """Free everything (a sentron does this between programs)."""
        self._free_offsets, self._free_sizes = [0], [self.capacity]
        self._blocks.clear()
        self.used = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    def stats(self) -> dict[str, int]:
        return {
            "capacity_bytes": self.capacity,
            "used_bytes": self.used,
            "peak_bytes": self.peak,
            "blocks": len(self._blocks),
        }


def bytes_needed(shapes_and_dtypes: list[tuple[tuple[int, ...], np.dtype | type]]) -> int:
    """Arena bytes that holding all these tensors at once takes, alignment included."""
    return sum(_round_up(math.prod(s) * np.dtype(d).itemsize) for s, d in shapes_and_dtypes)
