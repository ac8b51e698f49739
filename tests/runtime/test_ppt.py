"""The Phext Page Table: translation, placement, the translation cache and its errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vtpu.counters import COUNTERS
from vtpu.ppt import (
    Coordinate,
    CoordinateError,
    PhextPageTable,
    PPTError,
    measure,
    parse_coordinate,
    random_pattern,
    structured_pattern,
    to_array,
)


def coord(*tail: int, book: int = 1) -> tuple[int, ...]:
    """A coordinate in book `book` of 1.1.1/1.1.x, from its (chapter, section, scroll)."""
    return (1, 1, 1, 1, 1, book, *tail)


def test_translation_is_a_function_into_slot_aligned_arena_offsets() -> None:
    ppt = PhextPageTable(arena_pages=8192)
    pattern = random_pattern(20_000, seed=3, books=3, extent=40)
    first = ppt.translate_many(pattern)
    again = ppt.translate_many(pattern)
    assert np.array_equal(first, again)
    assert (first % ppt.slot_bytes == 0).all()
    assert (first < ppt.arena_bytes).all()
    unique_coords, index = np.unique(pattern, axis=0, return_index=True)
    assert len(np.unique(first[index])) == len(unique_coords)  # distinct coordinates never share


def test_single_and_batch_translation_agree_for_every_input_form() -> None:
    ppt = PhextPageTable()
    pattern = structured_pattern(3000, seed=1)
    batch = ppt.translate_many(pattern)
    for row, address in zip(pattern[::97], batch[::97], strict=True):
        c = Coordinate(*(int(v) for v in row))
        assert ppt.translate(c) == address
        assert ppt.translate(str(c)) == address
        assert ppt.translate(tuple(int(v) for v in row)) == address
        assert ppt.translate(row) == address  # a uint16 row, numpy scalars and all
    assert np.array_equal(ppt.translate_many(pattern.astype(np.int64)), batch)
    assert np.array_equal(ppt.translate_many(pattern.T.copy().T), batch)  # not C-contiguous


def test_consecutive_scrolls_and_neighbouring_sections_share_a_page() -> None:
    ppt = PhextPageTable()  # 64 slots of 64 bytes: a page is 32 scrolls x 2 sections
    assert ppt.page_tile() == (1, 2, 32)
    base = ppt.translate(coord(1, 1, 1))
    scrolls = [ppt.translate(coord(1, 1, s)) for s in range(1, 33)]
    assert scrolls == [base + 64 * i for i in range(32)]  # one page, in order
    neighbour = ppt.translate(coord(1, 2, 1))
    assert neighbour // 4096 == base // 4096
    assert ppt.stats()["pages_mapped"] == 1
    assert ppt.translate(coord(1, 1, 33)) // 4096 != base // 4096  # the 33rd starts a page


def test_pages_are_numbered_in_first_touch_order_and_regions_are_counted() -> None:
    ppt = PhextPageTable()
    assert ppt.translate(coord(5, 5, 5, book=2)) == 4 * 64  # first page touched is frame 0
    assert ppt.translate(coord(1, 1, 1, book=1)) == 4096  # a new region, the next frame
    assert ppt.translate(coord(9, 9, 100, book=2)) // 4096 == 2
    stats = ppt.stats()
    assert stats["pages_mapped"] == 3
    assert stats["regions"] == 2


def test_the_tlb_counts_hits_and_evicts_the_least_recently_used_way() -> None:
    # One set of two ways; pages A, B, C in three regions. Worked by hand:
    # A miss, B miss, A hit (B is now LRU), C miss evicts B, A hit, B miss evicts C, C miss.
    ppt = PhextPageTable(tlb_sets=1, tlb_ways=2)
    a, b, c = coord(1, 1, 1, book=1), coord(1, 1, 1, book=2), coord(1, 1, 1, book=3)
    expected_hits = []
    for page, hit in [(a, 0), (b, 0), (a, 1), (c, 0), (a, 1), (b, 0), (c, 0)]:
        ppt.translate(page)
        expected_hits.append(hit)
        assert ppt.stats()["hits"] == sum(expected_hits)
    stats = ppt.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"]) == (7, 2, 5)
    assert stats["hit_rate"] == pytest.approx(2 / 7)
    assert stats["pages_mapped"] == 3  # misses walked the table; pages were mapped once


def test_the_batch_path_keeps_the_same_lru_order_as_single_lookups() -> None:
    ppt = PhextPageTable(tlb_sets=1, tlb_ways=2)
    seq = [coord(1, 1, 1, book=b) for b in (1, 2, 1, 3, 1, 2, 3)]
    ppt.translate_many(np.array(seq, dtype=np.uint16))
    assert (ppt.stats()["hits"], ppt.stats()["misses"]) == (2, 5)


def test_same_page_lookups_hit_and_clear_tlb_forgets_translations_but_not_pages() -> None:
    ppt = PhextPageTable()
    first = ppt.translate(coord(2, 3, 4))
    ppt.translate(coord(2, 3, 5))  # same page
    assert (ppt.stats()["lookups"], ppt.stats()["hits"]) == (2, 1)
    ppt.clear_tlb()
    ppt.reset_stats()
    assert ppt.translate(coord(2, 3, 4)) == first
    stats = ppt.stats()
    assert (stats["lookups"], stats["hits"], stats["pages_mapped"]) == (1, 0, 1)
    ppt.reset_stats()
    assert ppt.stats() == {
        "lookups": 0,
        "hits": 0,
        "misses": 0,
        "hit_rate": None,
        "pages_mapped": 1,
        "regions": 1,
    }


def test_a_structured_scan_rarely_misses_and_random_access_mostly_misses() -> None:
    n = 200_000
    structured = measure(PhextPageTable(), structured_pattern(n), repeats=1)
    random = measure(PhextPageTable(), random_pattern(n), repeats=1)
    assert structured["lookups"] == random["lookups"] == n
    assert structured["miss_rate"] < 0.05
    assert random["miss_rate"] > 0.9


def test_structured_pattern_reads_books_scroll_by_scroll() -> None:
    pattern = structured_pattern(500, seed=2)
    assert pattern.dtype == np.uint16 and pattern.shape == (500, 9)
    assert (pattern >= 1).all() and (pattern <= 999).all()
    assert pattern[0].tolist() == [1] * 9
    steps = np.diff(pattern[:, 8].astype(int))
    assert (steps == 1).mean() > 0.9  # almost every step is the next scroll
    assert np.array_equal(structured_pattern(500, seed=2), pattern)  # deterministic per seed


def test_running_out_of_arena_pages_is_a_clear_error() -> None:
    ppt = PhextPageTable(arena_pages=2)
    ppt.translate(coord(1, 1, 1))
    ppt.translate(coord(1, 1, 1, book=2))
    assert ppt.translate(coord(1, 2, 5)) < 4096  # an already mapped page still translates
    with pytest.raises(PPTError, match=r"arena full: all 2 pages.*1\.1\.1/1\.1\.3/1\.1\.1"):
        ppt.translate(coord(1, 1, 1, book=3))
    rows = np.array([coord(1, 1, 2), coord(1, 1, 1, book=4)], dtype=np.uint16)
    with pytest.raises(PPTError, match=r"row 1 \(1\.1\.1/1\.1\.4/1\.1\.1\).*larger arena_pages"):
        ppt.translate_many(rows)
    assert ppt.stats()["pages_mapped"] == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ((1, 1, 1, 1, 1, 1, 1, 1, 0), r"row 2: scroll \(column 8\) is 0"),
        ((1, 1, 1, 1000, 1, 1, 1, 1, 1), r"row 2: collection \(column 3\) is 1000"),
    ],
)
def test_a_bad_coordinate_in_a_batch_is_rejected_with_its_row(row, message) -> None:
    ppt = PhextPageTable()
    batch = np.array([coord(1, 1, 1), coord(1, 1, 2), row], dtype=np.uint16)
    with pytest.raises(PPTError, match=message):
        ppt.translate_many(batch)
    with pytest.raises(PPTError, match=message):
        ppt.translate_many(batch.astype(np.int32))
    assert ppt.stats()["lookups"] == 0  # nothing was translated


def test_negative_and_huge_values_in_a_wide_batch_are_rejected_with_their_row() -> None:
    batch = np.ones((4, 9), dtype=np.int64)
    batch[3, 6] = -1
    with pytest.raises(PPTError, match=r"row 3: chapter \(column 6\) is -1"):
        PhextPageTable().translate_many(batch)
    batch[3, 6] = 70_000  # would wrap to a valid uint16 if cast blindly
    with pytest.raises(PPTError, match="row 3: chapter"):
        PhextPageTable().translate_many(batch)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.ones((3, 8), dtype=np.uint16), r"shape \(n, 9\).*got shape \(3, 8\)"),
        (np.ones(9, dtype=np.uint16), "shape"),
        (np.ones((2, 9), dtype=np.float64), "integers"),
        ("1.1.1/1.1.1/1.1.1", "shape"),
    ],
)
def test_translate_many_rejects_batches_of_the_wrong_shape_or_type(bad, message) -> None:
    with pytest.raises(PPTError, match=message):
        PhextPageTable().translate_many(bad)


def test_an_empty_batch_translates_to_nothing() -> None:
    out = PhextPageTable().translate_many(np.empty((0, 9), dtype=np.uint16))
    assert out.dtype == np.uint64 and out.shape == (0,)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ("1.1.1/1.1.1", CoordinateError, "2 group"),
        ((1, 1, 1, 1, 1, 1, 1, 1), PPTError, "9 numbers, got 8"),
        ((1, 1, 1, 1, 1, 1, 1, 1, 1000), PPTError, "scroll is 1000"),
        ((1, 1, 1, 1, 1, 1, 1, 1, 2**70), PPTError, "scroll is"),
        ((1, 1, 1, 1, 1, 1, 1, 1.0, 1), PPTError, "section must be an int"),
        (42, PPTError, "got int"),
    ],
)
def test_translate_rejects_bad_coordinates_with_a_reason(bad, error, message) -> None:
    ppt = PhextPageTable()
    with pytest.raises(error, match=message):
        ppt.translate(bad)
    assert ppt.stats()["lookups"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arena_pages": 0}, "arena_pages must be a positive int"),
        ({"page_bytes": 4096, "slot_bytes": 48}, "multiple of slot_bytes"),
        ({"page_bytes": 4096 * 3, "slot_bytes": 64}, "power of two"),
        ({"tlb_sets": 48}, "tlb_sets is 48"),
        ({"tlb_ways": 65}, "tlb_ways is 65"),
        ({"tlb_ways": 2.0}, "tlb_ways must be a positive int"),
    ],
)
def test_a_bad_configuration_is_refused_with_a_reason(kwargs, message) -> None:
    with pytest.raises(PPTError, match=message):
        PhextPageTable(**kwargs)


def test_other_page_shapes_keep_scrolls_together() -> None:
    ppt = PhextPageTable(page_bytes=65536, slot_bytes=16)  # 4096 slots
    chapters, sections, scrolls = ppt.page_tile()
    assert chapters * sections * scrolls == 4096 and scrolls >= sections >= chapters
    assert (chapters, sections, scrolls) == (1, 4, 1024)  # a whole section fits in a page
    addresses = [ppt.translate(coord(1, 1, s)) for s in range(1, 1000)]
    assert addresses == [16 * i for i in range(999)]


def test_lookups_and_hits_reach_the_runtime_counters() -> None:
    ppt = PhextPageTable()
    before = COUNTERS.snapshot()
    ppt.translate_many(np.array([coord(1, 1, 1), coord(1, 1, 2)], dtype=np.uint16))
    after_batch = COUNTERS.snapshot()
    assert after_batch["ppt_lookups"] - before["ppt_lookups"] == 2
    assert after_batch["ppt_hits"] - before["ppt_hits"] == 1
    for s in range(3, 13):
        ppt.translate(parse_coordinate(f"1.1.1/1.1.1/1.1.{s}"))
    ppt.flush_counters()  # single lookups are added in groups; flush makes them current
    after = COUNTERS.snapshot()
    assert after["ppt_lookups"] - before["ppt_lookups"] == 12
    assert after["ppt_hits"] - before["ppt_hits"] == 11


def test_measure_reports_rates_from_its_own_passes() -> None:
    ppt = PhextPageTable()
    pattern = structured_pattern(5000)
    result = measure(ppt, pattern, repeats=2, mode="single")
    assert result["lookups"] == 5000 and result["mode"] == "single"
    assert result["hits"] + result["misses"] == 5000
    assert result["ns_per_lookup"] > 0 and result["lookups_per_s"] > 0
    assert measure(ppt, pattern, repeats=1)["misses"] == result["misses"]  # batch == single
    with pytest.raises(PPTError, match="mode"):
        measure(ppt, pattern, mode="fast")
    with pytest.raises(PPTError, match="empty"):
        measure(ppt, pattern[:0])


def test_to_array_feeds_the_batch_path() -> None:
    ppt = PhextPageTable()
    c = parse_coordinate("3.1.4/1.5.9/2.6.5")
    assert ppt.translate_many(to_array(c)[None, :])[0] == ppt.translate(c)


def test_concurrent_batches_from_two_threads_see_one_consistent_table() -> None:
    pattern = structured_pattern(100_000, seed=5)
    expected = PhextPageTable().translate_many(pattern)
    shared = PhextPageTable()
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(shared.translate_many(pattern)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert all(np.array_equal(r, expected) for r in results)
    assert shared.stats()["lookups"] == 200_000


# ---- explicit mapping: map_many, unmap_many, map_on_touch=False ------------------------------


def rows(*coords: tuple[int, ...]) -> np.ndarray:
    return np.array(coords, dtype=np.uint16)


def test_map_many_places_pages_on_the_frames_given_and_unmap_many_returns_them() -> None:
    ppt = PhextPageTable(arena_pages=8, map_on_touch=False)
    assert ppt.map_on_touch is False
    pages = rows(coord(1, 1, 1), coord(1, 1, 40), coord(1, 1, 1, book=2))
    ppt.map_many(pages, [5, 0, 7])
    assert (ppt.translate_many(pages) // 4096).tolist() == [5, 0, 7]
    # Another slot of frame 5's page: scroll 3, section 2 (a page is 32 scrolls x 2 sections).
    assert ppt.translate(coord(1, 2, 3)) == 5 * 4096 + (2 + 32) * 64
    assert (ppt.stats()["pages_mapped"], ppt.stats()["regions"]) == (3, 2)
    assert ppt.unmap_many(pages[[2, 0]]).tolist() == [7, 5]
    assert (ppt.stats()["pages_mapped"], ppt.stats()["regions"]) == (1, 1)
    ppt.map_many(pages[:1], np.array([7], dtype=np.int32))  # a freed frame can be used again
    assert ppt.translate(pages[0]) == 7 * 4096
    assert ppt.unmap_many(pages[:2]).tolist() == [7, 0]
    assert ppt.stats()["pages_mapped"] == ppt.stats()["regions"] == 0
    assert ppt.unmap_many(np.empty((0, 9), np.uint16)).shape == (0,)
    ppt.map_many(np.empty((0, 9), np.uint16), [])  # an empty batch maps nothing


def test_a_lookup_after_unmap_never_returns_the_old_frame() -> None:
    ppt = PhextPageTable(arena_pages=4, map_on_touch=False)
    a, b, c = rows(coord(1, 1, 1)), rows(coord(1, 1, 1, book=2)), rows(coord(9, 9, 9))
    ppt.map_many(a, [2])
    ppt.map_many(c, [1])
    assert ppt.translate_many(a)[0] == ppt.translate(a[0]) == 2 * 4096  # now in the TLB
    ppt.unmap_many(a)
    ppt.reset_stats()
    with pytest.raises(PPTError, match=r"1\.1\.1/1\.1\.1/1\.1\.1 is not mapped.*map_many"):
        ppt.translate(a[0])
    with pytest.raises(PPTError, match=r"row 1 \(1\.1\.1/1\.1\.1/1\.1\.1\) is not mapped"):
        ppt.translate_many(np.concatenate([c, a]))
    stats = ppt.stats()
    assert (stats["lookups"], stats["hits"]) == (3, 0)  # counted, and A never hit the TLB
    # The frame goes to another page; the old coordinate still finds nothing.
    ppt.map_many(b, [2])
    assert ppt.translate(b[0]) == 2 * 4096
    with pytest.raises(PPTError, match="not mapped"):
        ppt.translate(a[0])


def test_unmap_invalidates_the_translation_cache_when_pages_map_on_touch() -> None:
    # One TLB set of two ways. A is cached on frame 0; unmap A and give frame 0 to C. Were A's
    # way still valid, A would hit it and alias C's page; instead A misses and gets a new frame.
    ppt = PhextPageTable(arena_pages=4, tlb_sets=1, tlb_ways=2)
    a, b, c = coord(1, 1, 1, book=1), coord(1, 1, 1, book=2), coord(1, 1, 1, book=3)
    assert [ppt.translate(x) // 4096 for x in (a, b)] == [0, 1]
    assert ppt.unmap_many(rows(a)).tolist() == [0]
    ppt.map_many(rows(c), [0])
    ppt.reset_stats()
    assert ppt.translate(a) // 4096 == 2  # mapped again, on the first free frame after the last
    assert (ppt.stats()["hits"], ppt.stats()["pages_mapped"]) == (0, 3)
    assert ppt.translate(c) // 4096 == 0 and ppt.translate(b) // 4096 == 1


def test_first_touch_skips_frames_in_use_and_reuses_freed_ones_after_the_arena_end() -> None:
    ppt = PhextPageTable(arena_pages=3)
    x, a, b, d = (coord(1, 1, 1, book=k) for k in (1, 2, 3, 4))
    ppt.map_many(rows(x), [0])
    assert [ppt.translate(p) // 4096 for p in (a, b)] == [1, 2]  # frame 0 is x's
    with pytest.raises(PPTError, match="arena full: all 3 pages"):
        ppt.translate(d)
    ppt.unmap_many(rows(a))
    assert ppt.translate(d) // 4096 == 1  # wraps around to the freed frame
    assert ppt.stats()["pages_mapped"] == 3 and ppt.stats()["regions"] == 3


def test_many_map_unmap_cycles_keep_every_remaining_page_findable() -> None:
    # Against a dict, with the arena nearly full so the page table (twice the arena) has long
    # probe runs; the TLB is cleared before each check so every lookup walks the table.
    rng = np.random.default_rng(11)
    arena = 256
    ppt = PhextPageTable(arena_pages=arena, map_on_touch=False, tlb_sets=4, tlb_ways=2)
    universe = np.ones((4000, 9), dtype=np.uint16)
    # Many regions too: the region table (pages per region) deletes by backward shift as well.
    universe[:, 5] = rng.integers(1, 200, size=4000)
    universe[:, 6] = rng.integers(1, 6, size=4000)  # chapters: one page each (slots are scrolls)
    universe = np.unique(universe, axis=0)
    keys = [tuple(int(v) for v in r) for r in universe]
    live: dict[tuple[int, ...], int] = {}
    free = list(range(arena))
    for cycle in range(300):
        if len(live) > 40 and (len(free) < 20 or rng.random() < 0.45):
            drop = rng.choice(len(live), size=int(rng.integers(1, 30)), replace=False)
            gone = [list(live)[i] for i in drop]
            assert ppt.unmap_many(rows(*gone)).tolist() == [live[k] for k in gone]
            for k in gone:
                free.append(live.pop(k))
        else:
            fresh = [k for k in (keys[i] for i in rng.permutation(len(keys))[:80]) if k not in live]
            fresh = fresh[: min(len(free), int(rng.integers(1, 40)))]
            frames = [free.pop(int(rng.integers(len(free)))) for _ in fresh]
            ppt.map_many(np.array(fresh, dtype=np.uint16).reshape(-1, 9), frames)
            live.update(zip(fresh, frames, strict=True))
        if cycle % 10 == 0 or cycle == 299:
            ppt.clear_tlb()
            assert (ppt.translate_many(rows(*live)) // 4096).tolist() == list(live.values())
            stats = ppt.stats()
            assert stats["pages_mapped"] == len(live)
            assert stats["regions"] == len({k[5] for k in live})
            for k in [k for k in keys[:200] if k not in live][:20]:
                with pytest.raises(PPTError, match="not mapped"):
                    ppt.translate(k)
    everything = rows(*live)
    ppt.unmap_many(everything)
    assert ppt.stats()["pages_mapped"] == ppt.stats()["regions"] == 0
    ppt.map_many(everything, range(len(everything)))  # the emptied table takes them all again
    assert (ppt.translate_many(everything) // 4096).tolist() == list(range(len(everything)))


@pytest.mark.parametrize(
    ("batch", "frames", "message"),
    [
        ([coord(1, 1, 1, book=9)], [1], r"row 0 \(1\.1\.1/1\.1\.9/1\.1\.1\): its page is already "
         r"mapped, to frame 1"),
        ([coord(2, 2, 2), coord(3, 3, 3)], [2, 1], r"row 1 \(1\.1\.1/1\.1\.1/3\.3\.3\): frame 1 "
         r"already holds the page of 1\.1\.1/1\.1\.9/1\.1\.1"),
        ([coord(2, 2, 2), coord(2, 2, 3)], [2, 3], "row 1 .*: row 0 maps the same page"),
        ([coord(2, 2, 2), coord(3, 3, 3)], [2, 2], "row 1 .*: frame 2 is named by row 0 too"),
        ([coord(2, 2, 2), coord(3, 3, 3)], [2, 8], r"row 1 .*: frame 8 is outside the arena "
         r"\(frames 0-7\)"),
        ([coord(2, 2, 2)], [-1], "frame -1 is outside the arena"),
        ([coord(2, 2, 2)], [2, 3], r"1 coordinate\(s\), frames of shape \(2,\)"),
        ([coord(2, 2, 2)], [2.0], "dtype float64"),
        ([coord(2, 2, 2), coord(0, 2, 2)], [2, 3], r"row 1: chapter \(column 6\) is 0"),
        ([(1, 1, 1)], [2], r"map_many takes a uint16 array of shape \(n, 9\)"),
    ],
)  # fmt: skip
def test_map_many_refuses_a_bad_batch_and_maps_none_of_it(batch, frames, message) -> None:
    ppt = PhextPageTable(arena_pages=8, map_on_touch=False)
    ppt.map_many(rows(coord(1, 1, 1, book=9)), [1])
    with pytest.raises(PPTError, match=message):
        ppt.map_many(np.array(batch), frames)
    assert ppt.stats()["pages_mapped"] == 1 and ppt.stats()["regions"] == 1
    with pytest.raises(PPTError, match="not mapped"):
        ppt.translate(coord(2, 2, 2))
    ppt.map_many(rows(coord(2, 2, 2)), [2])  # frame 2 and the page are still free


def test_unmap_many_refuses_a_page_that_is_not_mapped_and_unmaps_none() -> None:
    ppt = PhextPageTable(arena_pages=8, map_on_touch=False)
    pages = rows(coord(1, 1, 1), coord(1, 1, 1, book=2), coord(1, 1, 1, book=3))
    ppt.map_many(pages, [3, 4, 5])
    with pytest.raises(
        PPTError, match=r"row 2 \(1\.1\.1/1\.1\.4/1\.1\.1\): its page is not mapped"
    ):
        ppt.unmap_many(np.concatenate([pages[:2], rows(coord(1, 1, 1, book=4))]))
    with pytest.raises(PPTError, match="row 1 .*not mapped"):
        ppt.unmap_many(rows(coord(1, 1, 1), coord(1, 1, 2)))  # one page named twice
    with pytest.raises(PPTError, match=r"row 0: scroll \(column 8\) is 1000"):
        ppt.unmap_many(rows((1, 1, 1, 1, 1, 1, 1, 1, 1000)))
    assert ppt.stats()["pages_mapped"] == 3
    ppt.clear_tlb()
    assert (ppt.translate_many(pages) // 4096).tolist() == [3, 4, 5]


def test_map_on_touch_must_be_a_bool() -> None:
    with pytest.raises(PPTError, match="map_on_touch must be True or False"):
        PhextPageTable(map_on_touch=0)


def test_mapping_from_one_thread_while_another_translates() -> None:
    ppt = PhextPageTable(arena_pages=64, map_on_touch=False, tlb_sets=2, tlb_ways=2)
    steady = rows(*(coord(c, 1, 1) for c in range(1, 9)))
    ppt.map_many(steady, range(8))
    churn = rows(*(coord(c, 1, 1, book=2) for c in range(1, 33)))
    stop = threading.Event()
    errors: list[BaseException] = []

    def remap() -> None:
        try:
            while not stop.is_set():
                ppt.map_many(churn, range(8, 40))
                ppt.unmap_many(churn)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=remap)
    worker.start()
    try:
        for _ in range(2000):
            assert (ppt.translate_many(steady) // 4096).tolist() == list(range(8))
    finally:
        stop.set()
        worker.join()
    assert not errors
    assert ppt.stats()["pages_mapped"] == 8
