"""HTTP byte ranges (RFC 9110 section 14): the Range a download asks for, whether If-Range lets
it apply, and the Content-Range that answers it. Shared by the API (which serves slices of
stored files) and the CLI (which resumes downloads), so both read the headers the same way."""

from __future__ import annotations

import re
from dataclasses import dataclass

# One range only: `bytes=first-last`, `bytes=first-` or `bytes=-suffix`. Digits are ASCII
# ([0-9], not \d, which also matches other scripts' digits).
_SINGLE_RANGE = re.compile(r"bytes[ \t]*=[ \t]*([0-9]*)-([0-9]*)[ \t]*", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")
# A position with more digits than this is past any file there is; int() refuses numbers
# of thousands of digits, so such a position is read as this instead of parsed.
_MAX_DIGITS = 20
_BEYOND_ANY_FILE = 10**_MAX_DIGITS


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, stop) of a representation `size` bytes long: Python's half-open slice,
    where HTTP's `first-last` names the last byte."""

    start: int
    stop: int
    size: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


class Unsatisfiable:
    """A well-formed range that selects no byte of the file (it starts at or past the end,
    or is the empty suffix `bytes=-0`): answered 416 with `Content-Range: bytes */size`."""

    def __init__(self, size: int) -> None:
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def _position(digits: str) -> int:
    return int(digits) if len(digits.lstrip("0")) <= _MAX_DIGITS else _BEYOND_ANY_FILE


def requested_range(header: str | None, size: int) -> ByteRange | Unsatisfiable | None:
    """The slice a Range header asks of a `size`-byte file; None to send the whole file.

    RFC 9110 lets a server ignore Range, and Lathe does for what it does not serve: a header
    that is malformed, names another unit, or asks for several ranges (multipart/byteranges,
    which download tools do not need) gets the whole file, 200. A `last` past the end is
    cut to the end; a suffix longer than the file is the whole file (still a 206)."""
    if header is None:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # bytes=-N: the last N bytes
        suffix = _position(last)
        if suffix == 0 or size == 0:
            return Unsatisfiable(size)
        return ByteRange(max(size - suffix, 0), size, size)
    start = _position(first)
    if last and _position(last) < start:  # last before first: not a range-spec, ignored
        return None
    if start >= size:
        return Unsatisfiable(size)
    stop = _position(last) + 1 if last else size
    return ByteRange(start, min(stop, size), size)


def if_range_allows(if_range: str | None, etag: str) -> bool:
    """Whether the Range may apply: no If-Range, or one naming this exact version (a strong
    entity tag, compared strongly). A date, a weak tag or another tag means the client holds
    part of some other version: it gets the whole file instead of a slice to splice on."""
    if if_range is None:
        return True
    return not etag.startswith("W/") and if_range.strip() == etag


def parse_content_range(header: str | None) -> ByteRange | None:
    """A 206's `Content-Range: bytes first-last/size` as a ByteRange; None when missing or
    not that form (an unknown size, `*`, gives None too: a resume needs the size)."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None or match.group(3) == "*":
        return None
    first, last, size = (_position(g) for g in match.groups())
    if last < first or last >= size:
        return None
    return ByteRange(first, last + 1, size)


def strong_etag(digest: str) -> str:
    """The entity tag of a file: its SHA-256, quoted (a strong validator: byte-identical
    representations only)."""
    return f'"{digest}"'


def etag_digest(etag: str | None) -> str | None:
    """The digest inside a strong entity tag; None for a missing or weak one."""
    if not etag or etag.startswith("W/") or len(etag) < 2:
        return None
    if not (etag.startswith('"') and etag.endswith('"')):
        return None
    return etag[1:-1]
