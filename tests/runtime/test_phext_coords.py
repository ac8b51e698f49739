"""vtpu.ppt.coords against the reference implementation, the `phext` package."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phext.coordinate import Coordinate as PhextCoordinate

from vtpu.ppt.coords import (
    Coordinate,
    CoordinateError,
    format_coordinate,
    from_array,
    parse_coordinate,
    to_array,
)


def phext_parse(text: str) -> tuple[int, ...] | None:
    """The reference verdict: the parsed values, or None where phext rejects the string."""
    try:
        return PhextCoordinate.from_string(text).as_tuple()
    except ValueError:
        return None


def ours_parse(text: str) -> tuple[int, ...] | None:
    try:
        return parse_coordinate(text).as_tuple()
    except CoordinateError:
        return None


def assert_same_verdict(text: str) -> None:
    expected = phext_parse(text)
    got = ours_parse(text)
    assert got == expected, f"{text!r}: phext {expected}, ours {got}"
    if expected is not None:
        assert format_coordinate(parse_coordinate(text)) == str(PhextCoordinate.from_string(text))


# Strings made of what coordinates are made of, so most are near-misses rather than noise.
COORDINATE_ALPHABET = "0123456789./ +-_\t\n\u00a0\u0663\uff11\u0968\u2003x"
field = st.one_of(
    st.integers(min_value=-5, max_value=1005).map(str),
    st.text(alphabet=COORDINATE_ALPHABET, max_size=5),
    st.sampled_from(["01", "+1", "-1", "1_0", "1__0", "_1", " 7 ", "\u0663", "\uff19\uff19", "0"]),
)
UNICODE_DIGITS = ("\u0660", "\uff10", "\u0966")  # zeros of Arabic-Indic, fullwidth, Devanagari


@st.composite
def number_text(draw: st.DrawFn) -> str:
    """A number as int() might read it: padded, signed, zero-led, grouped, in other scripts."""
    # Mostly in range, so whole coordinates are often valid; now and then just outside it.
    if draw(st.integers(0, 29)) == 0:
        value = draw(st.sampled_from([-1, 0, 1000, 1003]))
    else:
        value = draw(st.integers(1, 999))
    text = str(abs(value))
    style = draw(st.sampled_from(["plain"] * 16 + ["zeros", "underscore", "unicode", "garbage"]))
    if style == "zeros":
        text = "0" * draw(st.integers(1, 3)) + text
    elif style == "underscore" and len(text) > 1:
        cut = draw(st.integers(1, len(text) - 1))
        text = text[:cut] + draw(st.sampled_from(["_", "__"])) + text[cut:]
    elif style == "unicode":
        zero = ord(draw(st.sampled_from(UNICODE_DIGITS)))
        text = "".join(chr(zero + int(d)) for d in text)
    elif style == "garbage":
        text = draw(field)
    sign = "-" if value < 0 else draw(st.sampled_from(["", "", "", "+"]))
    pad = draw(st.sampled_from(["", "", "", " ", "\t"]))
    return pad + sign + text + draw(st.sampled_from(["", "", " "]))


STANDARD_SEPARATORS = [".", ".", "/", ".", ".", "/", ".", "."]
coordinate_like = st.builds(
    lambda fields, seps, pad: (
        pad + "".join(f + s for f, s in zip(fields, seps + [""], strict=False))
    ),
    st.lists(number_text(), min_size=8, max_size=10),
    st.one_of(
        st.just(STANDARD_SEPARATORS),
        st.lists(st.sampled_from([".", ".", "/", "", "..", " "]), min_size=7, max_size=9),
        st.permutations(STANDARD_SEPARATORS),
    ),
    st.sampled_from(["", " ", "\t", "\n "]),
)
valid_numbers = st.lists(st.integers(min_value=1, max_value=999), min_size=9, max_size=9)


@settings(max_examples=600, deadline=None)
@given(coordinate_like)
def test_it_accepts_and_rejects_coordinate_like_strings_exactly_as_phext_does(text: str) -> None:
    assert_same_verdict(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=COORDINATE_ALPHABET, max_size=40))
def test_it_agrees_with_phext_on_strings_of_coordinate_characters(text: str) -> None:
    assert_same_verdict(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_it_agrees_with_phext_on_arbitrary_text(text: str) -> None:
    assert_same_verdict(text)


@settings(max_examples=200, deadline=None)
@given(valid_numbers)
def test_printing_a_parsed_valid_coordinate_gives_phexts_canonical_form(numbers: list[int]) -> None:
    text = "{}.{}.{}/{}.{}.{}/{}.{}.{}".format(*numbers)
    parsed = parse_coordinate(text)
    assert parsed.as_tuple() == tuple(numbers)
    assert format_coordinate(parsed) == str(PhextCoordinate(*numbers)) == text
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        " 01.+1.1/1.1.1/1.1.1 ",  # padding, a leading zero and a plus sign, as int() takes them
        "1_0.1.1/1.1.1/1.1.1",  # digit grouping
        "\u0663.1.1/1.1.1/1.1.\uff19",  # Arabic-Indic three, fullwidth nine
        "1.1.1.1/1.1/1.1.1",  # phext counts nine numbers, not three per group
        "1. 2 .3/4.5.6/7.8.999",
    ],
)
def test_it_keeps_phexts_leniencies(text: str) -> None:
    assert phext_parse(text) is not None
    assert ours_parse(text) == phext_parse(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1.1.1/1.1.1", "2 group(s)"),
        ("1.1.1/1.1.1/1.1.1/1", "4 group(s)"),
        ("1.1.1/1.x.1/1.1.1", "group 2"),
        ("1.1.1/1..1/1.1.1", "not a whole number"),
        ("1.1.1/1.1.1/1.1", "8 number(s)"),
        ("1.1.1/1.1.1/1.1.1000", "scroll is 1000"),
        ("0.1.1/1.1.1/1.1.1", "library is 0"),
        ("1.1.1/1.-3.1/1.1.1", "volume is -3"),
    ],
)
def test_it_rejects_bad_coordinates_and_says_why(text: str, reason: str) -> None:
    assert phext_parse(text) is None
    with pytest.raises(CoordinateError, match=re.escape(reason)):
        parse_coordinate(text)


def test_it_rejects_non_strings_with_a_reason() -> None:
    with pytest.raises(CoordinateError, match="got bytes"):
        parse_coordinate(b"1.1.1/1.1.1/1.1.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # CoordinateError is a ValueError
        parse_coordinate(None)  # type: ignore[arg-type]


def test_a_huge_bad_string_gives_a_short_message() -> None:
    with pytest.raises(CoordinateError) as info:
        parse_coordinate("9" * 100_000)
    assert len(str(info.value)) < 400


def test_a_coordinate_is_frozen_ordered_and_always_valid() -> None:
    a = Coordinate(1, 1, 1, 1, 1, 1, 1, 1, 2)
    b = parse_coordinate("1.1.1/1.1.1/1.2.1")
    assert a < b
    assert a == Coordinate.from_string("1.1.1/1.1.1/1.1.2")
    with pytest.raises(AttributeError):
        a.scroll = 3  # type: ignore[misc]
    with pytest.raises(CoordinateError, match="section is 1000"):
        Coordinate(1, 1, 1, 1, 1, 1, 1, 1000, 1)
    with pytest.raises(CoordinateError, match="chapter must be an int"):
        Coordinate(1, 1, 1, 1, 1, 1, "1", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(CoordinateError, match="book must be an int"):
        Coordinate(1, 1, 1, 1, 1, True, 1, 1, 1)


@given(valid_numbers)
def test_the_array_form_round_trips(numbers: list[int]) -> None:
    coord = Coordinate(*numbers)
    arr = to_array(coord)
    assert arr.dtype == np.uint16 and arr.shape == (9,)
    assert arr.tolist() == numbers
    assert from_array(arr) == coord


def test_the_array_form_rejects_bad_arrays() -> None:
    with pytest.raises(CoordinateError, match="shape"):
        from_array(np.ones(8, dtype=np.uint16))
    with pytest.raises(CoordinateError, match="dtype"):
        from_array(np.ones(9, dtype=np.float32))
    with pytest.raises(CoordinateError, match="scroll is 0"):
        from_array([1, 1, 1, 1, 1, 1, 1, 1, 0])
    with pytest.raises(CoordinateError, match="needs a Coordinate"):
        to_array((1,) * 9)  # type: ignore[arg-type]
