"""HTTP byte ranges as Lathe reads them: one range served, anything else the whole file, a
range past the end unsatisfiable, If-Range compared strongly."""

from __future__ import annotations

import pytest

from app.domain.byte_ranges import (
    ByteRange,
    Unsatisfiable,
    etag_digest,
    if_range_allows,
    parse_content_range,
    requested_range,
    strong_etag,
)


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=100-199", 100, 200),
        ("bytes=900-", 900, 1000),
        ("bytes=-100", 900, 1000),
        ("bytes=-5000", 0, 1000),  # a suffix longer than the file: all of it
        ("bytes=990-5000", 990, 1000),  # a last byte past the end: cut to the end
        ("bytes=999-999", 999, 1000),
        ("Bytes = 5-9 ", 5, 10),
        ("bytes=0-" + "9" * 5000, 0, 1000),  # digits int() would refuse
    ],
)
def test_a_single_range_selects_its_slice(header: str, start: int, stop: int) -> None:
    got = requested_range(header, 1000)
    assert got == ByteRange(start, stop, 1000)
    assert got.content_range == f"bytes {start}-{stop - 1}/1000"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=",
        "bytes=-",
        "bytes=0-1,5-9",  # several ranges: the whole file
        "bytes=9-5",  # last before first: not a range
        "items=0-9",
        "bytes=a-b",
        "bytes=٠-٩",  # Arabic-Indic digits are not HTTP's
        "bytes=+1-2",
        "bytes=0-1\x00",
    ],
)
def test_no_range_or_one_lathe_does_not_serve_means_the_whole_file(header) -> None:
    assert requested_range(header, 1000) is None


@pytest.mark.parametrize(
    "header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=" + "9" * 5000 + "-"]
)
def test_a_range_that_selects_no_byte_is_unsatisfiable(header: str) -> None:
    got = requested_range(header, 1000)
    assert isinstance(got, Unsatisfiable)
    assert got.content_range == "bytes */1000"


def test_an_empty_file_has_no_satisfiable_range() -> None:
    assert isinstance(requested_range("bytes=0-", 0), Unsatisfiable)
    assert isinstance(requested_range("bytes=-5", 0), Unsatisfiable)


def test_if_range_lets_the_range_apply_only_for_the_same_strong_etag() -> None:
    etag = strong_etag("ab" * 32)
    assert if_range_allows(None, etag)
    assert if_range_allows(etag, etag)
    assert not if_range_allows(strong_etag("cd" * 32), etag)
    assert not if_range_allows("W/" + etag, etag)
    assert not if_range_allows("Tue, 15 Nov 1994 08:12:31 GMT", etag)


def test_content_range_round_trips_and_odd_ones_are_refused() -> None:
    assert parse_content_range("bytes 100-199/1000") == ByteRange(100, 200, 1000)
    for odd in (None, "", "bytes */1000", "bytes 0-9/*", "bytes 9-0/10", "bytes 0-10/10"):
        assert parse_content_range(odd) is None


def test_etag_digest_reads_strong_tags_only() -> None:
    assert etag_digest(strong_etag("abc")) == "abc"
    for odd in (None, "", '"', "abc", 'W/"abc"'):
        assert etag_digest(odd) is None
