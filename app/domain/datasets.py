"""Fine-tuning dataset formats and line-by-line JSONL validation.

The validator is fed one line at a time, so a multi-gigabyte upload is checked while it
streams to storage, in constant memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

ROLES = ("system", "user", "assistant")


class DatasetFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"
    CLASSIFICATION = "classification"


FORMAT_LABELS = {
    DatasetFormat.CHAT: 'chat ({"messages": [...]})',
    DatasetFormat.PROMPT_COMPLETION: 'prompt/completion ({"prompt", "completion"})',
    DatasetFormat.TEXT: 'plain text ({"text"})',
    DatasetFormat.CLASSIFICATION: 'classification ({"text", "label"})',
}


class DatasetError(Exception):
    """A dataset problem, with the 1-based line it was found on (None: the whole file)."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        self.code = code
        self.line = line
        self.detail = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


@dataclass(frozen=True)
class DatasetStats:
    format: DatasetFormat
    examples: int
    characters: int


# What JSON's \\u escapes can spell but a training file must not hold: NUL (Postgres, C
# tokenizers and most tools end a string there) and UTF-16 surrogates that are not part of
# a pair (json.loads joins a valid pair into one character; a lone one cannot be encoded as
# UTF-8, so the job would fail when it tokenizes the file). As raw bytes, both are refused
# already: a raw NUL is invalid JSON and a surrogate is invalid UTF-8.
_FORBIDDEN_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def _strings(record: object) -> Iterator[tuple[str, str]]:
    """(where, string) for every key and string value in a parsed JSON value, iteratively
    (a record may be nested as deeply as json.loads allows)."""
    stack: list[tuple[str, object]] = [("", record)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            yield where or "the line", value
        elif isinstance(value, dict):
            for key, item in value.items():
                # A key is checked before the path that names it is used in a message.
                yield f"a key of {where or 'the object'}", key
                name = key if len(key) <= 40 else key[:40] + "..."
                path = f"{where}.{name}" if where else name
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def check_characters(record: object, line: int) -> None:
    """Refuse an escaped NUL (\\u0000) or lone surrogate (\\ud800) anywhere in the record."""
    for where, text in _strings(record):
        found = _FORBIDDEN_CHARACTER.search(text)
        if found is None:
            continue
        char = found.group()
        if char == "\x00":
            raise DatasetError("nul_character", f"{where} contains a NUL character (\\u0000)", line)
        raise DatasetError(
            "invalid_encoding",
            f"{where} contains a lone UTF-16 surrogate (\\u{ord(char):04x}), which is not "
            "valid Unicode",
            line,
        )


def detect_format(record: dict, line: int) -> DatasetFormat:
    if "messages" in record:
        return DatasetFormat.CHAT
    if "prompt" in record or "completion" in record:
        missing = "completion" if "prompt" in record else "prompt"
        if missing not in record:
            raise DatasetError("missing_key", f"missing key '{missing}'", line)
        return DatasetFormat.PROMPT_COMPLETION
    if "label" in record:
        if "text" not in record:
            raise DatasetError("missing_key", "missing key 'text' beside 'label'", line)
        return DatasetFormat.CLASSIFICATION
    if "text" in record:
        return DatasetFormat.TEXT
    found = ", ".join(repr(k) for k in list(record)[:5]) or "none"
    raise DatasetError(
        "missing_key",
        "expected key 'messages' (chat), 'prompt' and 'completion', 'text', or 'text' "
        "and 'label' (classification); "
        f"found keys: {found}",
        line,
    )


def _require_text(value: object, where: str, line: int, *, allow_empty: bool = False) -> int:
    if not isinstance(value, str):
        raise DatasetError("invalid_type", f"{where} must be a string", line)
    if not allow_empty and not value.strip():
        raise DatasetError("empty_value", f"{where} is empty", line)
    return len(value)


def validate_chat(record: dict, line: int) -> int:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError("invalid_type", "'messages' must be a non-empty list", line)
    chars = 0
    has_assistant = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError("invalid_type", f"{where} must be an object", line)
        for key in ("role", "content"):
            if key not in message:
                raise DatasetError("missing_key", f"{where} is missing key '{key}'", line)
        role = message["role"]
        if role not in ROLES:
            raise DatasetError(
                "unknown_role",
                f"{where}.role {role!r} is not one of {', '.join(ROLES)}",
                line,
            )
        has_assistant = has_assistant or role == "assistant"
        chars += _require_text(
            message["content"], f"{where}.content", line, allow_empty=role == "system"
        )
    if not has_assistant:
        raise DatasetError("no_assistant_message", "no message with role 'assistant'", line)
    return chars


def validate_prompt_completion(record: dict, line: int) -> int:
    return _require_text(record["prompt"], "'prompt'", line, allow_empty=True) + _require_text(
        record["completion"], "'completion'", line
    )


def validate_text(record: dict, line: int) -> int:
    return _require_text(record["text"], "'text'", line)


MAX_LABEL_CHARS = 128


def validate_classification(record: dict, line: int) -> int:
    label = record["label"]
    # A class is named by a string or an integer; bool is an int subclass in Python and
    # almost always a mistake here ("true" is not a class name).
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise DatasetError("invalid_type", "'label' must be a string or an integer", line)
    if isinstance(label, str) and not label.strip():
        raise DatasetError("empty_value", "'label' is empty", line)
    if len(str(label)) > MAX_LABEL_CHARS:
        raise DatasetError(
            "invalid_value", f"'label' is longer than {MAX_LABEL_CHARS} characters", line
        )
    return _require_text(record["text"], "'text'", line)


VALIDATORS = {
    DatasetFormat.CHAT: validate_chat,
    DatasetFormat.PROMPT_COMPLETION: validate_prompt_completion,
    DatasetFormat.TEXT: validate_text,
    DatasetFormat.CLASSIFICATION: validate_classification,
}


class DatasetValidator:
    """Feed raw JSONL lines in order; `finish()` returns the stats or raises DatasetError."""

    def __init__(self) -> None:
        self.format: DatasetFormat | None = None
        self.first_line: int | None = None
        self.examples = 0
        self.characters = 0
        self.line = 0

    def feed(self, raw: bytes) -> None:
        self.line += 1
        line = self.line
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                "invalid_encoding", f"not valid UTF-8 (byte {exc.start + 1})", line
            ) from None
        if not text.strip():
            return  # blank lines (a trailing newline, say) carry no example
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                "invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})", line
            ) from None
        except RecursionError:
            raise DatasetError("invalid_json", "invalid JSON: nested too deeply", line) from None
        except ValueError as exc:  # e.g. an integer literal past Python's digit limit
            raise DatasetError("invalid_json", f"invalid JSON: {exc}", line) from None
        if not isinstance(record, dict):
            raise DatasetError(
                "invalid_type", f"expected a JSON object, got {type(record).__name__}", line
            )
        if "\\u" in text:  # only an escape can put either character in a parsed string
            check_characters(record, line)
        fmt = detect_format(record, line)
        if self.format is None:
            self.format, self.first_line = fmt, line
        elif fmt != self.format:
            raise DatasetError(
                "mixed_formats",
                f"mixed formats: line {self.first_line} is {FORMAT_LABELS[self.format]} "
                f"but this line is {FORMAT_LABELS[fmt]}",
                line,
            )
        self.characters += VALIDATORS[fmt](record, line)
        self.examples += 1

    def finish(self) -> DatasetStats:
        if self.format is None:
            raise DatasetError("empty_file", "the file has no examples")
        return DatasetStats(self.format, self.examples, self.characters)


def validate_lines(lines: list[bytes]) -> DatasetStats:
    validator = DatasetValidator()
    for raw in lines:
        validator.feed(raw)
    return validator.finish()
