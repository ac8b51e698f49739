"""Access patterns for measuring the page table, and the measurement itself.

`structured_pattern` is how phext documents are read: book by book, chapter by chapter, section
by section, scroll by scroll, now and then looking back at the previous section, over a library
whose pages outnumber the translation cache (so misses are the page table's locality at work,
not a warm cache). `random_pattern` is the opposite: uniform coordinates over a space far larger
than the cache reaches, where a TLB cannot help.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from vtpu.ppt._ppt import PhextPageTable, PPTError


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PPTError(f"n must be a non-negative int, got {n!r}")


def structured_pattern(n: int, seed: int = 0, books: int = 16) -> np.ndarray:
    """uint16[n, 9]: `books` books (4-16 chapters of 4-32 sections of 8-64 scrolls) read in order.

    After each section the reader looks back at the previous one with probability 1/4. The
    library is read again from the start until n lookups are made.
    """
    _check_n(n)
    if not 1 <= books <= 999:
        raise PPTError(f"books must be 1-999, got {books!r}")
    rng = np.random.default_rng(seed)
    library = [
        [rng.integers(8, 65, size=int(rng.integers(4, 33))) for _ in range(rng.integers(4, 17))]
        for _ in range(books)
    ]
    out = np.empty((n, 9), dtype=np.uint16)
    out[:, :5] = 1
    filled = 0
    while filled < n:
        for book, chapters in enumerate(library, start=1):
            for chapter, sections in enumerate(chapters, start=1):
                for section in range(1, len(sections) + 1):
                    reads = [section]
                    if section > 1 and rng.random() < 0.25:
                        reads.append(section - 1)
                    for sec in reads:
                        count = int(sections[sec - 1])
                        take = min(count, n - filled)
                        if take <= 0:
                            return out
                        rows = out[filled : filled + take]
                        rows[:, 5] = book
                        rows[:, 6] = chapter
                        rows[:, 7] = sec
                        rows[:, 8] = np.arange(1, take + 1)
                        filled += take
    return out


def random_pattern(n: int, seed: int = 0, books: int = 8, extent: int = 64) -> np.ndarray:
    """uint16[n, 9]: uniform random books 1..books and chapter/section/scroll 1..extent.

    The defaults span 2,097,152 coordinates in 32,768 pages, 64 times what the default
    translation cache holds (512 entries).
    """
    _check_n(n)
    if not 1 <= books <= 999 or not 1 <= extent <= 999:
        raise PPTError(f"books and extent must be 1-999, got {books!r} and {extent!r}")
    rng = np.random.default_rng(seed)
    out = np.ones((n, 9), dtype=np.uint16)
    out[:, 5] = rng.integers(1, books + 1, size=n)
    out[:, 6:] = rng.integers(1, extent + 1, size=(n, 3))
    return out


def measure(
    ppt: PhextPageTable, pattern: np.ndarray, repeats: int = 5, mode: str = "batch"
) -> dict:
    """Miss rate and time per lookup of `pattern` on `ppt`, from a cold translation cache.

    A first pass maps the pattern's pages (reported as cold_ns_per_lookup); each of `repeats`
    timed passes then starts from a cleared TLB, so every pass sees the same hits and misses and
    the figure is translation with page walks, not page allocation. mode="batch" times
    translate_many over the whole pattern, mode="single" a Python loop of translate calls.
    """
    if mode not in ("batch", "single"):
        raise PPTError(f"mode is 'batch' or 'single', got {mode!r}")
    if repeats < 1:
        raise PPTError(f"repeats must be at least 1, got {repeats!r}")
    pattern = np.ascontiguousarray(pattern, dtype=np.uint16)
    n = len(pattern)
    if n == 0:
        raise PPTError("the pattern is empty; there is nothing to measure")
    rows = pattern.tolist() if mode == "single" else None

    def one_pass() -> int:
        ppt.clear_tlb()
        ppt.reset_stats()
        start = time.perf_counter_ns()
        if rows is None:
            ppt.translate_many(pattern)
        else:
            translate = ppt.translate
            for row in rows:
                translate(row)
        return time.perf_counter_ns() - start

    cold_ns = one_pass()
    times = [one_pass() for _ in range(repeats)]
    stats = ppt.stats()
    ns_per_lookup = statistics.median(times) / n
    return {
        "mode": mode,
        "lookups": stats["lookups"],
        "hits": stats["hits"],
        "misses": stats["misses"],
        "miss_rate": stats["misses"] / stats["lookups"],
        "ns_per_lookup": ns_per_lookup,
        "lookups_per_s": 1e9 / ns_per_lookup,
        "cold_ns_per_lookup": cold_ns / n,
        "repeats": repeats,
        "pages_mapped": stats["pages_mapped"],
    }
