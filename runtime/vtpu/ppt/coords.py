"""Phext coordinates: nine numbers, library.shelf.series/collection.volume.book/chapter.section.scroll.

The `phext` package (by the format's author) is the reference. `parse_coordinate` accepts and
rejects exactly the strings `phext.coordinate.Coordinate.from_string` does and yields the same
values, and `format_coordinate` prints what `str()` of a phext Coordinate prints. That includes
phext's leniencies, kept on purpose so a coordinate one tool accepts is never refused by another:
the text is `str.strip()`-ed, split on '/', each group split on '.', and each field read with
Python's `int()` (so ' 01', '+1', '1_0' and non-ASCII digits such as '٣' are numbers), and only
the total of nine numbers is checked, not three per group ('1.1.1.1/1.1/1.1.1' is accepted).

What we add is the reason: a rejected string raises `CoordinateError` (a `ValueError`) naming the
group, field or dimension that was wrong and what a valid coordinate looks like.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np

DIMENSIONS = (
    "library",
    "shelf",
    "series",
    "collection",
    "volume",
    "book",
    "chapter",
    "section",
    "scroll",
)
COORDINATE_MIN = 1
COORDINATE_MAX = 999
_EXAMPLE = "like 1.1.1/1.1.1/1.1.1"


class CoordinateError(ValueError):
    """A phext coordinate that the phext format does not accept; the message says why."""


def _show(text: str, limit: int = 60) -> str:
    """repr() of the input, shortened so a huge bad string cannot flood an error message."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def _check_value(value: object, dimension: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CoordinateError(f"{dimension} must be an int, got {type(value).__name__}")
    if not COORDINATE_MIN <= value <= COORDINATE_MAX:
        raise CoordinateError(
            f"{dimension} is {value}; every coordinate number must be "
            f"{COORDINATE_MIN}-{COORDINATE_MAX}"
        )
    return value


@dataclass(frozen=True, slots=True, order=True)
class Coordinate:
    """A valid phext coordinate (every number 1-999); ordered like phext's, library first."""

    library: int
    shelf: int
    series: int
    collection: int
    volume: int
    book: int
    chapter: int
    section: int
    scroll: int

    def __post_init__(self) -> None:
        # A Coordinate is always valid, so code holding one never re-checks it. One pass over
        # the values first: the per-dimension check (and its message) only runs when one fails.
        values = (
            self.library,
            self.shelf,
            self.series,
            self.collection,
            self.volume,
            self.book,
            self.chapter,
            self.section,
            self.scroll,
        )
        for value in values:
            if type(value) is not int or not COORDINATE_MIN <= value <= COORDINATE_MAX:
                for name, each in zip(DIMENSIONS, values, strict=True):
                    _check_value(each, name)

    def __str__(self) -> str:
        return format_coordinate(self)

    def as_tuple(self) -> tuple[int, ...]:
        return astuple(self)

    @classmethod
    def from_string(cls, text: str) -> Coordinate:
        return parse_coordinate(text)


def parse_coordinate(text: str) -> Coordinate:
    """Parse 'LB.SF.SR/CN.VM.BK/CH.SN.SC' exactly as phext does; CoordinateError says why not."""
    return Coordinate(*parse_numbers(text))


def parse_numbers(text: str) -> list[int]:
    """parse_coordinate's nine checked numbers, without building a Coordinate (for hot paths)."""
    if not isinstance(text, str):
        raise CoordinateError(
            f"a phext coordinate is a string {_EXAMPLE}, got {type(text).__name__}"
        )
    groups = text.strip().split("/")
    if len(groups) != 3:
        raise CoordinateError(
            f"{_show(text)} has {len(groups)} group(s) separated by '/'; "
            f"a phext coordinate has 3, {_EXAMPLE}"
        )
    numbers: list[int] = []
    for group_no, group in enumerate(groups, start=1):
        for field in group.split("."):
            try:
                numbers.append(int(field))
            except ValueError:
                raise CoordinateError(
                    f"{_show(text)}: group {group_no} ({_show(group, 30)}) holds "
                    f"{_show(field, 30)}, which is not a whole number; write numbers 1-999 "
                    f"separated by '.', {_EXAMPLE}"
                ) from None
    if len(numbers) != 9:
        raise CoordinateError(
            f"{_show(text)} holds {len(numbers)} number(s); a phext coordinate has 9 "
            f"(three per group), {_EXAMPLE}"
        )
    for name, value in zip(DIMENSIONS, numbers, strict=True):
        if not COORDINATE_MIN <= value <= COORDINATE_MAX:
            raise CoordinateError(
                f"{_show(text)}: {name} is {value}; every coordinate number must be "
                f"{COORDINATE_MIN}-{COORDINATE_MAX}"
            )
    return numbers


def format_coordinate(coord: Coordinate) -> str:
    """The canonical text form, the same as str() of a phext Coordinate."""
    c = coord
    return (
        f"{c.library}.{c.shelf}.{c.series}/"
        f"{c.collection}.{c.volume}.{c.book}/"
        f"{c.chapter}.{c.section}.{c.scroll}"
    )


def to_array(coord: Coordinate) -> np.ndarray:
    """The uint16[9] form the page table's batch API takes, library first."""
    if not isinstance(coord, Coordinate):
        raise CoordinateError(f"to_array needs a Coordinate, got {type(coord).__name__}")
    return np.array(astuple(coord), dtype=np.uint16)


def from_array(values: object) -> Coordinate:
    """A Coordinate from nine integers (a uint16[9] row, a list, ...), checked like any other."""
    arr = np.asarray(values)
    if arr.shape != (9,):
        raise CoordinateError(f"a coordinate array has shape (9,), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise CoordinateError(f"a coordinate array holds integers, got dtype {arr.dtype}")
    return Coordinate(*(int(v) for v in arr))
