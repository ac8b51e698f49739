# cython: language_level=3
"""The Phext Page Table: phext coordinate -> byte offset in the node's arena.

Layout (why neighbours in phext space are neighbours in memory)
----------------------------------------------------------------
A *region* is the first six numbers (library..book), packed 10 bits each into a 60-bit region id
(never 0, since every number is >= 1). Regions are independent address spaces: books do not share
pages. Inside a region the last three numbers (chapter, section, scroll), each 0..998 after
subtracting 1, are bit-interleaved into a 30-bit index (a generalised Morton / Z-order). The low
log2(slots per page) bits of the index are the slot in the page, the rest the virtual page number.

Which dimension feeds which bit decides which coordinates share a page. A plain 3-D Z-order
(scroll, section, chapter, scroll, ...) makes a 4x4x4 page tile: only 4 consecutive scrolls of a
section share a page, so reading one long section misses on every 4th scroll. Phext documents are
read scroll by scroll, so the page bits favour the scroll: with 64 slots a page holds 32
consecutive scrolls of 2 consecutive sections (the low bits are s s s s s n). That keeps a long
section dense (1 page walk per 32 scrolls) and a document of short sections still fills pages two
sections at a time. Above the page the index continues as a 3-D Z-order (scroll, section,
chapter). In a simulation of streamed books (1-48 scrolls per section), re-read books and
one long section, this tile missed 3.3 / 1.8 / 3.2 % of lookups against 5.4 / 5.0 / 6.4 % for the
4x4x4 tile and 4.2 / 2.5 / 1.6 % for 64 scrolls in a row.

Mapping: on first touch, or explicitly
----------------------------------------
By default a page is mapped the first time a lookup touches it, to the next free frame in
first-touch order (so a scan also walks the arena forwards). A table built with
map_on_touch=False maps only what map_many(coords, frames) names, to the frames its owner chose,
and a lookup of anything else raises PPTError: the KV cache of a resident decoder
(vtpu.models.kvcache) maps a sequence's pages as it allocates them and unmaps them when the
sequence is freed. unmap_many works in both modes and returns the frames the pages held; the
first-touch allocator skips frames in use and, once it has reached the end of the arena, reuses
freed ones. map_many and unmap_many are all or nothing: a batch that fails on a row is undone.

Translation cache (TLB)
-----------------------
Set-associative, keyed by (region id, virtual page number), true LRU within a set (a per-table
clock stamps every hit and fill; the victim is an empty way or the oldest stamp). The set index is
a mixed hash of the key, not the low page-number bits: with a Z-order only a third of the page
number's bits change along one dimension, and low-bit indexing would crowd a scan into a few sets.
A miss walks the page table, an open-addressing hash table with linear probing sized to at least
twice the arena's page count (every mapped page holds its own frame, so the table is never more
than half full and never resizes), allocating a frame when the page is new and the table maps on
touch. Unmapping deletes by backward shift (each later entry of the probe run moves into the hole
if its home slot allows it), not with tombstones, so lookups after any number of map/unmap cycles
probe exactly as far as in a table that never deleted; the entry's translation-cache way is
invalidated at once, so a lookup after unmap never sees the old frame. A reverse index (frame ->
table slot) says which page holds a frame, and the region table counts pages per region, so
`regions` in stats() is the regions with a page mapped now.

Everything on the lookup path is C: no Python objects, and the batch runs without the GIL under a
mutex that also guards the single-coordinate path.
"""

cimport cython
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from vtpu.counters import COUNTERS
from vtpu.ppt.coords import (
    COORDINATE_MAX,
    COORDINATE_MIN,
    DIMENSIONS,
    Coordinate,
    parse_numbers,
)

# Single-coordinate lookups reach COUNTERS in batches of this many: a COUNTERS.add costs about as
# much as several lookups. Batch calls, stats() and flush_counters() add everything pending.
cdef uint64_t SINGLE_FLUSH_EVERY = 256
cdef int SPAN = 1000  # coordinate numbers are 1..999; index tables by the raw number
cdef uint32_t MAX_TLB_SETS = 1 << 20
cdef uint32_t MAX_TLB_WAYS = 64
cdef uint64_t MAX_ARENA_PAGES = (<uint64_t>1) << 31
cdef uint16_t LOWEST = COORDINATE_MIN  # C copies of the limits, for the nogil row check
cdef uint16_t HIGHEST = COORDINATE_MAX
# Negative results of the C core's lookups and the codes of its batch map / unmap.
cdef int64_t FULL = -1  # the page is new and every frame of the arena is in use
cdef int64_t UNMAPPED = -2  # the page is not mapped and the table does not map on touch
cdef int ALREADY_MAPPED = 1
cdef int FRAME_IN_USE = 2


class PPTError(ValueError):
    """The page table could not translate: a bad coordinate (row named) or the arena is full."""


cdef struct PageEntry:
    uint64_t region  # 0 = empty slot
    uint32_t vpn
    uint32_t frame


cdef struct RegionEntry:
    uint64_t region  # 0 = empty slot
    uint64_t pages  # pages of the region mapped now (an entry is deleted when it reaches 0)


cdef struct TlbEntry:
    uint64_t region  # 0 = invalid way
    uint64_t stamp
    uint32_t vpn
    uint32_t frame


cdef inline uint64_t _mix(uint64_t region, uint64_t vpn) noexcept nogil:
    # splitmix64 finaliser over region and page number: every output bit depends on every input
    # bit, so both the TLB set (high bits) and the page-table slot (low bits) spread evenly.
    cdef uint64_t h = region ^ (vpn * <uint64_t>0x9E3779B97F4A7C15ULL)
    h ^= h >> 30
    h *= <uint64_t>0xBF58476D1CE4E5B9ULL
    h ^= h >> 27
    h *= <uint64_t>0x94D049BB133111EBULL
    h ^= h >> 31
    return h


cdef inline uint64_t _region_of(const uint16_t* c) noexcept nogil:
    return (<uint64_t>c[0] | (<uint64_t>c[1] << 10) | (<uint64_t>c[2] << 20)
            | (<uint64_t>c[3] << 30) | (<uint64_t>c[4] << 40) | (<uint64_t>c[5] << 50))


cdef inline bint _may_fill(uint64_t home, uint64_t hole, uint64_t at, uint64_t mask) noexcept nogil:
    # Backward-shift deletion: the entry at `at` (probe run started at `home`) may move back into
    # `hole` when the hole lies on its probe path, i.e. cyclically in [home, at).
    return ((at - home) & mask) >= ((at - hole) & mask)


def _bit_order(int slot_bits):
    """Dimension feeding each index bit, lowest first: 0 = scroll, 1 = section, 2 = chapter.

    The page bits go mostly to the scroll (5 of 6 for 64 slots), then the rest interleave
    scroll, section, chapter in turn until each dimension has its 10 bits.
    """
    left = [10, 10, 10]
    order = []
    section_bits = slot_bits // 6
    for dim, count in ((0, slot_bits - section_bits), (1, section_bits)):
        take = min(count, left[dim])
        order += [dim] * take
        left[dim] -= take
    while len(order) < slot_bits:  # more page bits than scroll+section can give
        dim = 1 if left[1] else 2
        order.append(dim)
        left[dim] -= 1
    while sum(left):
        for dim in (0, 1, 2):
            if left[dim]:
                order.append(dim)
                left[dim] -= 1
    return order


@cython.final
cdef class PhextPageTable:
    """Maps phext coordinates to slot-aligned byte offsets in an arena of `arena_pages` pages.

    A page holds page_bytes // slot_bytes slots (a power of two). Pages are mapped on first touch,
    or, with map_on_touch=False, only by map_many (a lookup of an unmapped page raises PPTError).
    The translation cache has tlb_sets (a power of two) x tlb_ways entries, LRU within a set.
    """

    cdef PageEntry* _table
    cdef uint64_t _table_mask
    cdef RegionEntry* _regions
    cdef uint64_t _regions_mask
    cdef uint64_t _region_count
    cdef uint64_t* _frame_slot  # [frame] -> 1 + table slot of the page holding it; 0 = free
    cdef TlbEntry* _tlb
    cdef TlbEntry* _last  # the entry that served the previous lookup, or NULL
    cdef uint32_t _sets
    cdef uint32_t _ways
    cdef uint64_t _clock
    cdef uint64_t _lookups
    cdef uint64_t _hits
    cdef uint64_t _retired_lookups  # counts moved out of _lookups/_hits by reset_stats()
    cdef uint64_t _retired_hits
    cdef uint64_t _flushed_lookups
    cdef uint64_t _flushed_hits
    cdef uint64_t _cursor  # where the first-touch allocator looks for a free frame next
    cdef uint64_t _mapped  # pages mapped now
    cdef bint _map_on_touch
    cdef uint64_t _arena_pages
    cdef uint64_t _page_bytes
    cdef uint64_t _slot_bytes
    cdef uint32_t _slot_bits
    cdef uint32_t _spread[3][1000]  # [scroll, section, chapter][number] -> index bits
    cdef cython.pymutex _lock

    def __cinit__(
        self, arena_pages=65536, page_bytes=4096, slot_bytes=64, tlb_sets=64, tlb_ways=8,
        map_on_touch=True,
    ):
        if not isinstance(map_on_touch, bool):
            raise PPTError(f"map_on_touch must be True or False, got {map_on_touch!r}")
        for name, value in (
            ("arena_pages", arena_pages),
            ("page_bytes", page_bytes),
            ("slot_bytes", slot_bytes),
            ("tlb_sets", tlb_sets),
            ("tlb_ways", tlb_ways),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PPTError(f"{name} must be a positive int, got {value!r}")
        if arena_pages > MAX_ARENA_PAGES:
            raise PPTError(f"arena_pages is {arena_pages}; at most {MAX_ARENA_PAGES} are supported")
        if page_bytes % slot_bytes:
            raise PPTError(
                f"page_bytes ({page_bytes}) must be a multiple of slot_bytes ({slot_bytes})"
            )
        slots = page_bytes // slot_bytes
        if slots & (slots - 1) or slots > (1 << 30):
            raise PPTError(
                f"page_bytes / slot_bytes is {slots}; it must be a power of two up to 2**30 "
                "(e.g. page_bytes=4096, slot_bytes=64)"
            )
        if tlb_sets & (tlb_sets - 1) or tlb_sets > MAX_TLB_SETS:
            raise PPTError(f"tlb_sets is {tlb_sets}; use a power of two up to {MAX_TLB_SETS}")
        if tlb_ways > MAX_TLB_WAYS:
            raise PPTError(f"tlb_ways is {tlb_ways}; at most {MAX_TLB_WAYS} are supported")

        self._arena_pages = arena_pages
        self._page_bytes = page_bytes
        self._slot_bytes = slot_bytes
        self._slot_bits = (slots - 1).bit_length()
        self._sets = tlb_sets
        self._ways = tlb_ways
        self._map_on_touch = map_on_touch

        cdef uint64_t capacity = 16
        while capacity < 2 * self._arena_pages:
            capacity <<= 1
        # calloc: the OS maps zero pages lazily, so a big arena costs memory only as it fills.
        self._table = <PageEntry*>calloc(capacity, sizeof(PageEntry))
        self._regions = <RegionEntry*>calloc(capacity, sizeof(RegionEntry))
        self._frame_slot = <uint64_t*>calloc(self._arena_pages, sizeof(uint64_t))
        self._tlb = <TlbEntry*>calloc(<size_t>tlb_sets * tlb_ways, sizeof(TlbEntry))
        if (self._table == NULL or self._regions == NULL or self._frame_slot == NULL
                or self._tlb == NULL):
            raise MemoryError(
                f"cannot allocate a page table for {arena_pages} arena pages; use fewer"
            )
        self._table_mask = capacity - 1
        self._regions_mask = capacity - 1

        cdef int dim, bit, number
        cdef int next_bit[3]
        memset(self._spread, 0, sizeof(self._spread))
        next_bit[0] = next_bit[1] = next_bit[2] = 0
        for bit, dim in enumerate(_bit_order(self._slot_bits)):
            for number in range(COORDINATE_MIN, COORDINATE_MAX + 1):
                if ((number - 1) >> next_bit[dim]) & 1:
                    self._spread[dim][number] |= (<uint32_t>1) << bit
            next_bit[dim] += 1

    def __dealloc__(self):
        free(self._table)
        free(self._regions)
        free(self._frame_slot)
        free(self._tlb)

    # ---- the C core: trusts its input (1..999, checked by the Python layer) ----

    cdef uint64_t _region_slot(self, uint64_t region) noexcept nogil:
        """The region table's slot holding `region`, or the empty slot where it would go."""
        cdef uint64_t i = _mix(region, 0) & self._regions_mask
        while self._regions[i].region != 0 and self._regions[i].region != region:
            i = (i + 1) & self._regions_mask
        return i

    cdef void _region_add(self, uint64_t region) noexcept nogil:
        cdef uint64_t i = self._region_slot(region)
        if self._regions[i].region == 0:
            self._regions[i].region = region
            self._region_count += 1
        self._regions[i].pages += 1

    cdef void _region_drop(self, uint64_t region) noexcept nogil:
        cdef uint64_t mask = self._regions_mask
        cdef uint64_t hole = self._region_slot(region)
        cdef uint64_t at = hole
        self._regions[hole].pages -= 1
        if self._regions[hole].pages:
            return
        self._region_count -= 1
        while True:
            at = (at + 1) & mask
            if self._regions[at].region == 0:
                break
            if _may_fill(_mix(self._regions[at].region, 0) & mask, hole, at, mask):
                self._regions[hole] = self._regions[at]
                hole = at
        self._regions[hole].region = 0
        self._regions[hole].pages = 0

    cdef uint64_t _slot(self, uint64_t region, uint32_t vpn, uint64_t h) noexcept nogil:
        """The page table's slot holding (region, vpn), or the empty slot where it would go."""
        cdef uint64_t i = h & self._table_mask
        cdef PageEntry* e = &self._table[i]
        while e.region != 0 and not (e.region == region and e.vpn == vpn):
            i = (i + 1) & self._table_mask
            e = &self._table[i]
        return i

    cdef void _insert(self, uint64_t i, uint64_t region, uint32_t vpn, uint64_t frame) noexcept nogil:
        """Map (region, vpn) to `frame` in the empty slot i that _slot() found for it."""
        self._table[i].region = region
        self._table[i].vpn = vpn
        self._table[i].frame = <uint32_t>frame
        self._frame_slot[frame] = i + 1
        self._mapped += 1
        self._region_add(region)

    cdef uint64_t _remove(self, uint64_t hole) noexcept nogil:
        """Unmap the page in slot `hole` and forget its translation; the frame it held."""
        cdef uint64_t mask = self._table_mask
        cdef uint64_t at = hole
        cdef PageEntry* e = &self._table[hole]
        cdef uint64_t frame = e.frame
        self._tlb_forget(e.region, e.vpn, _mix(e.region, e.vpn))
        self._frame_slot[frame] = 0
        self._mapped -= 1
        self._region_drop(e.region)
        while True:
            at = (at + 1) & mask
            e = &self._table[at]
            if e.region == 0:
                break
            if _may_fill(_mix(e.region, e.vpn) & mask, hole, at, mask):
                self._table[hole] = e[0]
                self._frame_slot[e.frame] = hole + 1
                hole = at
        self._table[hole].region = 0
        return frame

    cdef void _tlb_forget(self, uint64_t region, uint32_t vpn, uint64_t h) noexcept nogil:
        cdef TlbEntry* ways = &self._tlb[((h >> 32) & (self._sets - 1)) * self._ways]
        cdef uint32_t w
        for w in range(self._ways):
            if ways[w].region == region and ways[w].vpn == vpn:
                ways[w].region = 0  # an empty way: the next fill of the set takes it first
                ways[w].stamp = 0
                if self._last == &ways[w]:
                    self._last = NULL

    cdef int64_t _alloc_frame(self) noexcept nogil:
        """The next free frame at or after the cursor (wrapping), or FULL."""
        if self._mapped >= self._arena_pages:
            return FULL
        while self._frame_slot[self._cursor] != 0:  # ends: a frame is free
            self._cursor += 1
            if self._cursor == self._arena_pages:
                self._cursor = 0
        cdef uint64_t frame = self._cursor
        self._cursor = 0 if frame + 1 == self._arena_pages else frame + 1
        return <int64_t>frame

    cdef int64_t _walk(self, uint64_t region, uint32_t vpn, uint64_t h) noexcept nogil:
        """Page-table walk: the frame of (region, vpn), mapped now if new and the table maps on
        touch; FULL if there is no free frame, UNMAPPED if the table does not map on touch."""
        cdef uint64_t i = self._slot(region, vpn, h)
        if self._table[i].region != 0:
            return self._table[i].frame
        if not self._map_on_touch:
            return UNMAPPED
        cdef int64_t frame = self._alloc_frame()
        if frame >= 0:
            self._insert(i, region, vpn, <uint64_t>frame)
        return frame

    cdef inline uint32_t _vpn_of(self, const uint16_t* c) noexcept nogil:
        return (self._spread[2][c[6]] | self._spread[1][c[7]] | self._spread[0][c[8]]) >> self._slot_bits

    cdef int64_t _translate(self, const uint16_t* c) noexcept nogil:
        cdef uint64_t region = _region_of(c)
        cdef uint32_t index = self._spread[2][c[6]] | self._spread[1][c[7]] | self._spread[0][c[8]]
        cdef uint32_t vpn = index >> self._slot_bits
        cdef uint64_t slot = index & ((<uint32_t>1 << self._slot_bits) - 1)
        cdef TlbEntry* last = self._last
        self._clock += 1
        self._lookups += 1
        # A scan stays on one page for many lookups: check the entry that served the previous
        # lookup before hashing. It is an ordinary TLB entry, so hits and LRU order are unchanged.
        if last != NULL and last.region == region and last.vpn == vpn:
            last.stamp = self._clock
            self._hits += 1
            return <int64_t>(last.frame * self._page_bytes + slot * self._slot_bytes)
        cdef uint64_t h = _mix(region, vpn)
        cdef TlbEntry* ways = &self._tlb[((h >> 32) & (self._sets - 1)) * self._ways]
        cdef uint32_t w, victim = 0
        cdef int64_t frame
        for w in range(self._ways):
            if ways[w].region == region and ways[w].vpn == vpn:
                ways[w].stamp = self._clock
                self._hits += 1
                self._last = &ways[w]
                return <int64_t>(ways[w].frame * self._page_bytes + slot * self._slot_bytes)
        frame = self._walk(region, vpn, h)
        if frame < 0:
            return frame
        for w in range(self._ways):
            if ways[w].region == 0:
                victim = w
                break
            if ways[w].stamp < ways[victim].stamp:
                victim = w
        ways[victim].region = region
        ways[victim].vpn = vpn
        ways[victim].frame = <uint32_t>frame
        ways[victim].stamp = self._clock
        self._last = &ways[victim]
        return <int64_t>(<uint64_t>frame * self._page_bytes + slot * self._slot_bytes)

    cdef int64_t _translate_rows(
        self, const uint16_t[:, ::1] coords, uint64_t[::1] out, int64_t* why
    ) noexcept nogil:
        """Translate every row; the first row that failed (its reason in why), or -1."""
        cdef Py_ssize_t i
        cdef int64_t address
        for i in range(coords.shape[0]):
            address = self._translate(&coords[i, 0])
            if address < 0:
                why[0] = address
                return i
            out[i] = <uint64_t>address
        return -1

    cdef Py_ssize_t _map_rows(
        self, const uint16_t[:, ::1] coords, const uint64_t[::1] frames, int* code,
        uint64_t* detail
    ) noexcept nogil:
        """Map row r's page to frames[r] for every row, or none: the first row that could not be
        mapped (code; detail = the frame its page has, or the region and vpn holding its frame),
        after undoing the rows before it. -1 when all were mapped."""
        cdef Py_ssize_t r, k
        cdef uint64_t region, h, i, frame
        cdef uint32_t vpn
        cdef PageEntry* holder
        for r in range(coords.shape[0]):
            region = _region_of(&coords[r, 0])
            vpn = self._vpn_of(&coords[r, 0])
            h = _mix(region, vpn)
            i = self._slot(region, vpn, h)
            frame = frames[r]
            if self._table[i].region != 0:
                code[0] = ALREADY_MAPPED
                detail[0] = self._table[i].frame
            elif self._frame_slot[frame] != 0:
                holder = &self._table[self._frame_slot[frame] - 1]
                code[0] = FRAME_IN_USE
                detail[0] = holder.region
                detail[1] = holder.vpn
            else:
                self._insert(i, region, vpn, frame)
                continue
            for k in range(r - 1, -1, -1):
                region = _region_of(&coords[k, 0])
                vpn = self._vpn_of(&coords[k, 0])
                self._remove(self._slot(region, vpn, _mix(region, vpn)))
            return r
        return -1

    cdef Py_ssize_t _unmap_rows(self, const uint16_t[:, ::1] coords, uint64_t[::1] freed) noexcept nogil:
        """Unmap every row's page (its frame into freed[r]), or none: the first row whose page
        was not mapped, after mapping the rows before it back to their frames. -1 when all were."""
        cdef Py_ssize_t r, k
        cdef uint64_t region, h, i
        cdef uint32_t vpn
        for r in range(coords.shape[0]):
            region = _region_of(&coords[r, 0])
            vpn = self._vpn_of(&coords[r, 0])
            h = _mix(region, vpn)
            i = self._slot(region, vpn, h)
            if self._table[i].region != 0:
                freed[r] = self._remove(i)
                continue
            for k in range(r - 1, -1, -1):
                region = _region_of(&coords[k, 0])
                vpn = self._vpn_of(&coords[k, 0])
                h = _mix(region, vpn)
                self._insert(self._slot(region, vpn, h), region, vpn, freed[k])
            return r
        return -1

    # ---- the Python layer: validates, then calls the core ----

    def translate(self, coord) -> int:
        """Arena byte offset of one coordinate (a Coordinate, a phext string or nine ints)."""
        cdef uint16_t c[9]
        cdef int64_t address
        if isinstance(coord, str):
            coord = parse_numbers(coord)  # checked already; skips building a Coordinate
        if isinstance(coord, Coordinate):
            c[0] = coord.library
            c[1] = coord.shelf
            c[2] = coord.series
            c[3] = coord.collection
            c[4] = coord.volume
            c[5] = coord.book
            c[6] = coord.chapter
            c[7] = coord.section
            c[8] = coord.scroll
        else:
            _read_nine(coord, c)
        with self._lock:
            address = self._translate(c)
        if self._retired_lookups + self._lookups - self._flushed_lookups >= SINGLE_FLUSH_EVERY:
            self.flush_counters()
        if address < 0:
            raise self._lookup_error(address, f"coordinate {_fmt(c)}")
        return address

    def translate_many(self, coords) -> np.ndarray:
        """Arena byte offsets (uint64[n]) of a uint16[n, 9] batch of coordinates, library first.

        Every row is checked before any is translated. If the arena fills part-way, the rows
        before the one named in the error were translated and their pages stay mapped.
        """
        arr = _checked_batch(coords, "translate_many")
        out = np.empty(arr.shape[0], dtype=np.uint64)
        if arr.shape[0] == 0:
            return out
        cdef const uint16_t[:, ::1] view = arr
        cdef uint64_t[::1] out_view = out
        cdef int64_t bad_row, why = 0
        with nogil:
            with self._lock:
                bad_row = self._translate_rows(view, out_view, &why)
        self.flush_counters()
        if bad_row >= 0:
            raise self._lookup_error(why, f"row {bad_row} ({_fmt_row(arr[bad_row])})")
        return out

    def map_many(self, coords, frames) -> None:
        """Map each row's page (the page holding the coordinate) to frames[row], an arena frame.

        coords is a uint16[n, 9] batch as translate_many takes, frames n integers 0 to
        arena_pages - 1. All or nothing: a page already mapped, a frame already holding a page
        (or named twice) or out of range raises PPTError naming the row, and maps nothing.
        """
        arr = _checked_batch(coords, "map_many")
        n = arr.shape[0]
        try:
            f = np.asarray(frames)
        except (TypeError, ValueError) as exc:
            raise PPTError(f"map_many takes frames as {n} integers: {exc}") from None
        if f.shape != (n,) or (n and f.dtype.kind not in "iu"):
            raise PPTError(
                f"map_many takes one integer frame per coordinate: {n} coordinate(s), frames "
                f"of shape {f.shape} and dtype {f.dtype}"
            )
        if n == 0:
            return
        out_of_range = np.flatnonzero((f < 0) | (f >= self._arena_pages))
        if len(out_of_range):
            row = int(out_of_range[0])
            raise PPTError(
                f"row {row} ({_fmt_row(arr[row])}): frame {int(f[row])} is outside the arena "
                f"(frames 0-{self._arena_pages - 1})"
            )
        f = np.ascontiguousarray(f, dtype=np.uint64)
        cdef const uint16_t[:, ::1] view = arr
        cdef const uint64_t[::1] frame_view = f
        cdef Py_ssize_t bad_row
        cdef int code = 0
        cdef uint64_t detail[2]
        with nogil:
            with self._lock:
                bad_row = self._map_rows(view, frame_view, &code, detail)
        if bad_row < 0:
            return
        where = f"row {bad_row} ({_fmt_row(arr[bad_row])})"
        # A frame named by an earlier row of the batch was mapped by that row (then undone).
        frame = detail[0] if code == ALREADY_MAPPED else int(f[bad_row])
        earlier = np.flatnonzero(f[:bad_row] == frame)
        if code == ALREADY_MAPPED:
            if len(earlier):
                raise PPTError(f"{where}: row {int(earlier[0])} maps the same page; nothing was mapped")
            raise PPTError(
                f"{where}: its page is already mapped, to frame {frame}; unmap it first "
                "(nothing was mapped)"
            )
        if len(earlier):
            raise PPTError(
                f"{where}: frame {frame} is named by row {int(earlier[0])} too; each frame holds "
                "one page (nothing was mapped)"
            )
        raise PPTError(
            f"{where}: frame {frame} already holds the page of "
            f"{self._page_text(detail[0], detail[1])}; each frame holds one page (nothing was "
            "mapped)"
        )

    def unmap_many(self, coords) -> np.ndarray:
        """Unmap each row's page; the frames they held (uint64[n]), free for map_many again.

        The pages' translation-cache entries are dropped, so a later lookup walks the table and
        finds them unmapped. All or nothing: a page not mapped (or named twice) raises PPTError
        naming the row, and unmaps nothing.
        """
        arr = _checked_batch(coords, "unmap_many")
        freed = np.zeros(arr.shape[0], dtype=np.uint64)
        if arr.shape[0] == 0:
            return freed
        cdef const uint16_t[:, ::1] view = arr
        cdef uint64_t[::1] freed_view = freed
        cdef Py_ssize_t bad_row
        with nogil:
            with self._lock:
                bad_row = self._unmap_rows(view, freed_view)
        if bad_row >= 0:
            raise PPTError(
                f"row {bad_row} ({_fmt_row(arr[bad_row])}): its page is not mapped; nothing "
                "was unmapped"
            )
        return freed

    def _lookup_error(self, int64_t why, what):
        if why == UNMAPPED:
            return PPTError(
                f"{what} is not mapped: this table maps pages only through map_many "
                "(map_on_touch=False)"
            )
        return PPTError(
            f"arena full: all {self._arena_pages} pages of {self._page_bytes} bytes are mapped "
            f"and {what} needs a new page; create the PhextPageTable with a larger arena_pages"
        )

    def _page_text(self, uint64_t region, uint64_t vpn) -> str:
        """The coordinate of a page's first slot, from its region id and page number."""
        numbers = [(region >> (10 * j)) & 1023 for j in range(6)] + [1, 1, 1]
        order = _bit_order(self._slot_bits)
        seen = [0, 0, 0]
        for bit, dim in enumerate(order):
            if bit >= self._slot_bits and (vpn >> (bit - self._slot_bits)) & 1:
                numbers[8 - dim] += 1 << seen[dim]
            seen[dim] += 1
        return _fmt_row(numbers)

    def flush_counters(self) -> None:
        """Add lookups and hits not yet reported to vtpu.counters.COUNTERS."""
        cdef uint64_t lookups, hits
        with self._lock:
            lookups = self._retired_lookups + self._lookups - self._flushed_lookups
            hits = self._retired_hits + self._hits - self._flushed_hits
            self._flushed_lookups += lookups
            self._flushed_hits += hits
        if lookups:
            COUNTERS.add(ppt_lookups=lookups, ppt_hits=hits)

    def stats(self) -> dict:
        """Lookups, hits and misses since the last reset_stats(), and what is mapped."""
        self.flush_counters()
        with self._lock:
            lookups = self._lookups
            hits = self._hits
        return {
            "lookups": lookups,
            "hits": hits,
            "misses": lookups - hits,
            "hit_rate": hits / lookups if lookups else None,
            "pages_mapped": self._mapped,
            "regions": self._region_count,
        }

    def reset_stats(self) -> None:
        """Zero this table's lookup and hit counts (COUNTERS keeps its running totals)."""
        with self._lock:
            self._retired_lookups += self._lookups
            self._retired_hits += self._hits
            self._lookups = 0
            self._hits = 0

    def clear_tlb(self) -> None:
        """Invalidate every translation-cache entry; mapped pages stay mapped."""
        with self._lock:
            memset(self._tlb, 0, <size_t>self._sets * self._ways * sizeof(TlbEntry))
            self._last = NULL

    def page_tile(self) -> tuple:
        """(chapters, sections, scrolls) that share one page: the page's shape in phext space."""
        order = _bit_order(self._slot_bits)[: self._slot_bits]
        return (1 << order.count(2), 1 << order.count(1), 1 << order.count(0))

    @property
    def arena_pages(self) -> int:
        return self._arena_pages

    @property
    def page_bytes(self) -> int:
        return self._page_bytes

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def arena_bytes(self) -> int:
        return self._arena_pages * self._page_bytes

    @property
    def tlb_sets(self) -> int:
        return self._sets

    @property
    def tlb_ways(self) -> int:
        return self._ways

    @property
    def map_on_touch(self) -> bool:
        return self._map_on_touch


cdef Py_ssize_t _first_invalid(const uint16_t[:, ::1] coords, Py_ssize_t* col) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef uint16_t v
    for i in range(coords.shape[0]):
        for j in range(9):
            v = coords[i, j]
            if v < LOWEST or v > HIGHEST:
                col[0] = j
                return i
    return -1


cdef void _read_nine(object coord, uint16_t* c) except *:
    cdef Py_ssize_t j
    cdef long v
    if type(coord) is not tuple and type(coord) is not list:
        try:
            coord = tuple(coord)
        except TypeError:
            raise PPTError(
                "translate takes a Coordinate, a phext string like '1.1.1/1.1.1/1.1.1' or nine "
                f"ints; got {type(coord).__name__}"
            ) from None
    if len(coord) != 9:
        raise PPTError(f"a coordinate has 9 numbers, got {len(coord)}")
    for j in range(9):
        item = coord[j]
        if type(item) is not int:
            if isinstance(item, bool) or not hasattr(item, "__index__"):
                raise PPTError(f"{DIMENSIONS[j]} must be an int, got {type(item).__name__}")
            item = item.__index__()
        try:
            v = item
        except OverflowError:
            v = 0
        if v < LOWEST or v > HIGHEST:
            raise PPTError(
                f"{DIMENSIONS[j]} is {item}; every coordinate number must be "
                f"{COORDINATE_MIN}-{COORDINATE_MAX}"
            )
        c[j] = <uint16_t>v


def _checked_batch(coords, what):
    """A C-contiguous uint16 (n, 9) array of valid coordinates, or PPTError naming the row."""
    arr = _as_batch(coords, what)
    cdef const uint16_t[:, ::1] view = arr
    cdef Py_ssize_t bad_row, bad_col = 0
    with nogil:
        bad_row = _first_invalid(view, &bad_col)
    if bad_row >= 0:
        raise PPTError(
            f"row {bad_row}: {DIMENSIONS[bad_col]} (column {bad_col}) is "
            f"{int(arr[bad_row, bad_col])}; every coordinate number must be "
            f"{COORDINATE_MIN}-{COORDINATE_MAX}"
        )
    return arr


def _as_batch(coords, what):
    try:
        arr = np.asarray(coords)
    except (TypeError, ValueError) as exc:
        raise PPTError(f"{what} takes a uint16 array of shape (n, 9): {exc}") from None
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise PPTError(
            f"{what} takes a uint16 array of shape (n, 9), one coordinate per row; "
            f"got shape {arr.shape}"
        )
    if arr.dtype != np.uint16:
        if arr.dtype.kind not in "iu":
            raise PPTError(f"coordinates must be integers (uint16), got dtype {arr.dtype}")
        if arr.size:
            bad = np.argwhere((arr < COORDINATE_MIN) | (arr > COORDINATE_MAX))
            if len(bad):
                row, col = (int(x) for x in bad[0])
                raise PPTError(
                    f"row {row}: {DIMENSIONS[col]} (column {col}) is {int(arr[row, col])}; "
                    f"every coordinate number must be {COORDINATE_MIN}-{COORDINATE_MAX}"
                )
        arr = arr.astype(np.uint16)
    return np.ascontiguousarray(arr)


def _fmt_row(row) -> str:
    r = [int(v) for v in row]
    return f"{r[0]}.{r[1]}.{r[2]}/{r[3]}.{r[4]}.{r[5]}/{r[6]}.{r[7]}.{r[8]}"


cdef str _fmt(const uint16_t* c):
    return _fmt_row([c[j] for j in range(9)])
