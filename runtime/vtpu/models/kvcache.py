"""The paged KV cache of a resident decoder (docs/architecture.md, "LLM decoding (Qwen3)").

One float32 arena is allocated when the model loads (`cache_bytes`, rounded down to whole pages)
and never grows; the OS backs its memory as pages are first written, so RSS stays below
`cache_bytes` until the cache has been filled once. A page holds `page_tokens` consecutive tokens of one sequence, for every layer:
arena[page, layer, 0 = K | 1 = V, kv_head] is a block of page_tokens * head_dim floats, K stored
transposed ([head_dim][page_tokens]) and V as [page_tokens][head_dim], the layout decode
attention reads in place (vtpu.kernels._decode, through vtpu.kernels.decoder).

Pages are found through the Phext Page Table (vtpu.ppt, built with map_on_touch=False). Page i of
sequence s has the phext coordinate `page_coordinates(s, i)`:

    library.shelf.series/collection.volume.book  = the sequence id in base 999, digits + 1
    chapter.section.scroll                        = the page index i in base 999, digits + 1

so sequence 1's page 0 is 1.1.1/1.1.1/1.1.1 and sequence 2's page 1000 is 1.1.1/1.1.2/1.2.2: each
sequence is its own PPT region (book), its pages consecutive scrolls. The page index never leaves
its 999**3 space (a cache holds at most 999**3 pages). Sequence ids are counted from 1 and wrap
modulo 999**6 (about 10**18: a sequence a second for 3 * 10**10 years); a wrapped id could only
collide with a sequence still live from 999**6 ids before, and the PPT refuses to map a page that
is mapped already, so even that would raise PPTError, never alias two sequences' pages.

A page is mapped to its arena frame (`PhextPageTable.map_many`) when the allocator gives it to the
sequence, and unmapped (`unmap_many`, which also drops its translation-cache entry) when the
sequence is freed, so the PPT's `pages_mapped` is the cache's `pages_used`. Each forward step
translates the coordinates of every page of every sequence in the batch in one `translate_many`
call: where the K and V of a token are in memory is the PPT's answer, and `ppt_lookups` /
`ppt_hits` in vtpu.counters count that real work.

Contract: `prepare()` takes the pages a step needs for every sequence of the batch at once, or
none and raises `CacheFull` (how many pages were needed and how many are free); `free()` returns a
sequence's pages at once and is idempotent. The allocator is guarded by a lock, so free() and
stats() may run on other threads while the engine's one worker thread runs prefill and decode.
The step's translation runs under the same lock as free(), so a step either sees the sequence
freed (prepare raises ValueError) or translates all its pages before they are unmapped. Pages are
only ever allocated on that worker thread, so a page freed mid-step is not handed out again before
the step ends (the step may still write its K and V there; nothing reads them).
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from vtpu.ppt import PhextPageTable

_SPAN = 999  # numbers per coordinate dimension
_MAX_PAGES = _SPAN**3  # chapter x section x scroll: the pages of one sequence
SEQUENCE_IDS = _SPAN**6  # library..book: sequence ids wrap modulo this
_NO_COORDS = np.zeros((0, 9), dtype=np.uint16)


class CacheFull(Exception):
    """The KV cache has fewer free pages than a step needs; the message says how many."""


class Sequence:
    """One sequence's place in the cache: `length` tokens stored in `pages` (read-only)."""

    __slots__ = ("id", "length", "_pages", "_coords", "_freed")

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.length = 0
        self._pages: list[int] = []  # arena frames, in token order
        self._coords = _NO_COORDS  # uint16 (len(_pages), 9): their phext coordinates
        self._freed = False

    @property
    def pages(self) -> tuple[int, ...]:
        return tuple(self._pages)

    @property
    def coordinates(self) -> np.ndarray:
        """uint16 (pages, 9): the phext coordinates of the sequence's pages (a read-only view)."""
        view = self._coords.view()
        view.flags.writeable = False
        return view

    @property
    def freed(self) -> bool:
        return self._freed

    def __repr__(self) -> str:
        state = ", freed" if self._freed else ""
        return f"Sequence(id={self.id}, length={self.length}, pages={len(self._pages)}{state})"


def _digits(value: int, count: int) -> list[int]:
    """`value` in base 999 as `count` coordinate numbers (digit + 1), most significant first."""
    out = []
    for _ in range(count):
        value, digit = divmod(value, _SPAN)
        out.append(digit + 1)
    return out[::-1]


def page_coordinates(seq_id: int, first: int, count: int = 1) -> np.ndarray:
    """uint16 (count, 9): the coordinates of pages first .. first + count - 1 of sequence seq_id
    (the scheme is in the module docstring)."""
    if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 1:
        raise ValueError(f"a sequence id is a positive integer, got {seq_id!r}")
    if first < 0 or count < 0 or first + count > _MAX_PAGES:
        raise ValueError(
            f"pages {first}..{first + count - 1} are outside a sequence's {_MAX_PAGES} pages"
        )
    p = np.arange(first, first + count, dtype=np.int64)
    coords = np.empty((count, 9), dtype=np.uint16)
    coords[:, :6] = _digits((seq_id - 1) % SEQUENCE_IDS, 6)
    coords[:, 6] = p // (_SPAN * _SPAN) + 1
    coords[:, 7] = (p // _SPAN) % _SPAN + 1
    coords[:, 8] = p % _SPAN + 1
    return coords


class PagedKVCache:
    """The arena, its page allocator and the PPT that locates its pages (module docstring)."""

    def __init__(
        self, *, layers: int, kv_heads: int, head_dim: int, page_tokens: int, cache_bytes: int
    ) -> None:
        for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("page_tokens", page_tokens)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int):
            raise ValueError(f"cache_bytes must be an integer, got {cache_bytes!r}")
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.page_tokens = page_tokens
        self.bytes_per_page = 4 * layers * 2 * kv_heads * page_tokens * head_dim
        self.pages_total = min(cache_bytes // self.bytes_per_page, _MAX_PAGES)
        if self.pages_total < 1:
            raise ValueError(
                f"cache_bytes={cache_bytes} holds no page: one page of {page_tokens} tokens takes "
                f"{self.bytes_per_page} bytes for this model; give at least that"
            )
        # np.zeros: the OS maps the arena's pages as they are first written.
        self.arena = np.zeros(
            (self.pages_total, layers, 2, kv_heads, page_tokens * head_dim), dtype=np.float32
        )
        sets = 1
        while sets * 8 < self.pages_total and sets < 4096:
            sets *= 2
        # One slot per page: a coordinate names a whole page, and frame f is the arena's row f.
        self.ppt = PhextPageTable(
            arena_pages=self.pages_total,
            page_bytes=self.bytes_per_page,
            slot_bytes=self.bytes_per_page,
            tlb_sets=sets,
            tlb_ways=8,
            map_on_touch=False,
        )
        self._free = list(range(self.pages_total - 1, -1, -1))  # a stack: low pages first
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live = 0

    @property
    def nbytes(self) -> int:
        return self.arena.nbytes

    def pages_needed(self, tokens: int) -> int:
        """Pages a sequence of `tokens` tokens occupies."""
        return -(-max(0, tokens) // self.page_tokens)

    def new_sequence(self) -> Sequence:
        with self._lock:
            self._live += 1
            return Sequence(next(self._ids))

    def prepare(self, seqs: list[Sequence], new_tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Give each sequence the pages to hold new_tokens[i] more tokens (all or none, else
        CacheFull), then translate every page of every sequence through the PPT in one batch.

        Returns (frames int64, page_start int64 (len(seqs) + 1)): sequence b's pages are
        frames[page_start[b]:page_start[b + 1]], in token order.
        """
        with self._lock:
            for s in seqs:
                if s._freed:
                    raise ValueError(f"sequence {s.id} was freed; start a new one")
            want = [
                max(0, self.pages_needed(s.length + n) - len(s._pages))
                for s, n in zip(seqs, new_tokens, strict=True)
            ]
            total, free = sum(want), len(self._free)
            if total > free:
                raise CacheFull(
                    f"the KV cache needs {total} more page(s) of {self.page_tokens} tokens for "
                    f"this step and {free} of {self.pages_total} are free; finish or free a "
                    "sequence, or load the model with a larger cache"
                )
            for s, n in zip(seqs, want, strict=True):
                if n:
                    self._grow(s, n)
            counts = [len(s._pages) for s in seqs]
            # Translated under the lock: a free() from another thread waits for the step's
            # lookups, so it cannot unmap a page between a sequence's check and its translation.
            coords = np.concatenate([s._coords for s in seqs]) if seqs else _NO_COORDS
            offsets = self.ppt.translate_many(coords)
        page_start = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(counts, out=page_start[1:])
        return (offsets // np.uint64(self.bytes_per_page)).astype(np.int64), page_start

    def _grow(self, s: Sequence, n: int) -> None:
        """Give s n more pages from the free list and map them in the PPT (the lock is held)."""
        frames = [self._free.pop() for _ in range(n)]
        coords = page_coordinates(s.id, len(s._pages), n)
        try:
            self.ppt.map_many(coords, frames)
        except Exception:
            self._free.extend(reversed(frames))
            raise
        s._pages.extend(frames)
        s._coords = np.concatenate([s._coords, coords])

    def free(self, seq: Sequence) -> None:
        """Return the sequence's pages at once; it holds no tokens after. Idempotent."""
        with self._lock:
            if seq._freed:
                return
            if seq._pages:
                self.ppt.unmap_many(seq._coords)
            self._free.extend(reversed(seq._pages))
            seq._pages = []
            seq._coords = _NO_COORDS
            seq.length = 0
            seq._freed = True
            self._live -= 1

    def stats(self) -> dict:
        with self._lock:
            used = self.pages_total - len(self._free)
            live = self._live
        return {
            "pages_total": self.pages_total,
            "pages_used": used,
            "page_tokens": self.page_tokens,
            "bytes_per_page": self.bytes_per_page,
            "sequences": live,
        }
