"""The worker reads a training file's lines as the upload validator split them: the same
examples on the same line numbers, whatever separators other than "\\n" a line holds."""

from __future__ import annotations

import io
import json
from pathlib import Path

from app.domain.datasets import DatasetValidator
from app.services.files import ValidatingReader
from worker.training.data import read_jsonl


class RecordingValidator(DatasetValidator):
    """The upload validator, noting the line of each example it accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.example_lines: list[int] = []

    def feed(self, raw: bytes) -> None:
        before = self.examples
        super().feed(raw)
        if self.examples > before:
            self.example_lines.append(self.line)


def validated_lines(content: bytes) -> list[int]:
    """Line numbers the validator counted an example on, fed by the upload's own reader
    (app.services.files.ValidatingReader) in small chunks, as a streamed upload feeds it."""
    validator = RecordingValidator()
    reader = ValidatingReader(io.BytesIO(content), validator, len(content))
    while reader.read(7):
        pass
    return validator.example_lines


def test_the_worker_numbers_lines_as_the_validator_did(tmp_path: Path) -> None:
    def text(value: str) -> bytes:
        return json.dumps({"text": value}, ensure_ascii=False).encode()

    content = b"\n".join(
        [
            text("one"),
            b"",  # blank
            b"  \t ",  # whitespace only
            text("a\rcarriage return inside") + b"\r",  # CRLF ending: "\r" is JSON whitespace
            text("line\u2028separator and NEL\x85 raw, not escaped"),
            "\u2028".encode(),  # a line of only U+2028: whitespace to str.strip, so blank
            b"\r",
            text("last"),
        ]
    )
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    assert validated_lines(content) == [n for n, _ in read_jsonl(path)] == [1, 4, 5, 8]
