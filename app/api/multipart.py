"""A multipart/form-data body read part by part as it arrives.

python-multipart's push parser behind a pull interface: a part is a file-like object whose
`read(size)` pulls the body's next chunks through the parser, so a file part can be handed
to object storage (ObjectStore.put reads it) while the client is still sending it. The body
is never gathered in memory or spooled to disk, unlike Starlette's `request.form()`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

_HEADERS, _DATA, _PART_END, _END = range(4)


class FormError(Exception):
    """The body is not well-formed multipart/form-data."""


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type; FormError for anything else."""
    media, options = parse_options_header(content_type or "")
    if media != b"multipart/form-data" or not options.get(b"boundary"):
        raise FormError("the request body must be multipart/form-data with a boundary")
    return options[b"boundary"]


def _text(raw: bytes) -> str:
    """A header parameter as clients send it: UTF-8, or latin-1 from older clients."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Part:
    """One part: its form field name, its filename (None for a plain field), its data."""

    def __init__(self, form: MultipartStream, headers: dict[bytes, bytes]) -> None:
        disposition, options = parse_options_header(headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise FormError("each part needs a 'Content-Disposition: form-data; name=...' header")
        self.name = _text(options[b"name"])
        self.filename = _text(options[b"filename"]) if b"filename" in options else None
        self._form = form
        self._buffer = bytearray()
        self._done = False

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the part's data (all that is left for a negative size);
        b"" at its end."""
        while not self._done and (size < 0 or len(self._buffer) < size):
            kind, data = self._form._next_event()
            if kind == _DATA:
                self._buffer += data
            elif kind == _PART_END:
                self._done = True
            else:  # the parser ends a part before it starts another or ends the body
                raise FormError("a part ended without its data")
        size = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    def read_text(self, max_bytes: int) -> str:
        """A plain field's value as UTF-8 text; FormError past `max_bytes` or if not UTF-8."""
        value = self.read(max_bytes + 1)
        if len(value) > max_bytes or self.read(1):
            raise FormError(f"field {self.name!r} is longer than {max_bytes} bytes")
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise FormError(f"field {self.name!r} is not UTF-8 text") from None

    def drain(self) -> None:
        while self.read(64 * 1024):
            pass


class MultipartStream:
    """The parts of a multipart body whose bytes come from `chunks`, in order."""

    def __init__(self, chunks: Iterator[bytes], boundary: bytes) -> None:
        self._chunks = chunks
        self._events: deque[tuple[int, Any]] = deque()
        self._headers: dict[bytes, bytes] = {}
        self._header_name = self._header_value = b""
        self._finished = False
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": lambda: self._events.append((_PART_END, b"")),
                    "on_end": lambda: self._events.append((_END, b"")),
                },
            )
        except FormParserError as exc:
            raise FormError(f"malformed multipart boundary: {exc}") from None

    def parts(self) -> Iterator[Part]:
        """Each part in turn; what a caller leaves unread of one is skipped."""
        while True:
            kind, value = self._next_event()
            if kind == _END:
                return
            if kind != _HEADERS or not isinstance(value, dict):
                raise FormError("data outside a part")
            part = Part(self, value)
            yield part
            part.drain()

    def _next_event(self) -> tuple[int, Any]:
        while not self._events:
            if self._finished:
                raise FormError("the body ended before the multipart closing boundary")
            chunk = next(self._chunks, None)
            try:
                if chunk is None:
                    self._finished = True
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except FormParserError as exc:
                raise FormError(f"malformed multipart body: {exc}") from None
        return self._events.popleft()

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        # The part's headers travel in the event: one chunk may hold several parts.
        self._events.append((_HEADERS, self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.append((_DATA, data[start:end]))
