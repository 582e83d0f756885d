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
    PREFERENCE = "preference"


FORMAT_LABELS = {
    DatasetFormat.CHAT: 'chat ({"messages": [...]})',
    DatasetFormat.PROMPT_COMPLETION: 'prompt/completion ({"prompt", "completion"})',
    DatasetFormat.TEXT: 'plain text ({"text"})',
    DatasetFormat.CLASSIFICATION: 'classification ({"text", "label"})',
    DatasetFormat.PREFERENCE: (
        'preference ({"input": {"messages"}, "preferred_output", "non_preferred_output"})'
    ),
}


def format_label(fmt: str | None) -> str:
    """How a message names a file's format ('chat ({"messages": [...]})')."""
    if fmt is None:
        return "of unknown format"
    return next((label for known, label in FORMAT_LABELS.items() if known == fmt), fmt)


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


PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


def detect_format(record: dict, line: int) -> DatasetFormat:
    # Preference first: a line with either output is a preference pair, even if it also
    # holds 'messages' (the prompt put at the top level instead of under 'input'), which
    # would otherwise train as chat with the outputs silently ignored.
    if "preferred_output" in record or "non_preferred_output" in record:
        for key in PREFERENCE_KEYS:
            if key not in record:
                hint = (
                    " (the prompt goes in input.messages, not in messages)"
                    if key == "input" and "messages" in record
                    else ""
                )
                raise DatasetError("missing_key", f"missing key '{key}'{hint}", line)
        return DatasetFormat.PREFERENCE
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
    if isinstance(record.get("input"), dict):
        raise DatasetError(
            "missing_key",
            "missing keys 'preferred_output' and 'non_preferred_output' beside 'input'",
            line,
        )
    found = ", ".join(repr(k) for k in list(record)[:5]) or "none"
    raise DatasetError(
        "missing_key",
        "expected key 'messages' (chat), 'prompt' and 'completion', 'text', 'text' "
        "and 'label' (classification), or 'input', 'preferred_output' and "
        "'non_preferred_output' (preference); "
        f"found keys: {found}",
        line,
    )


def _require_text(value: object, where: str, line: int, *, allow_empty: bool = False) -> int:
    if not isinstance(value, str):
        raise DatasetError("invalid_type", f"{where} must be a string", line)
    if not allow_empty and not value.strip():
        raise DatasetError("empty_value", f"{where} is empty", line)
    return len(value)


def _validate_messages(messages: object, path: str, line: int) -> tuple[int, list[str]]:
    """Check a conversation at `path` ("messages", "input.messages"); returns the characters
    of its content and its roles in order."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError("invalid_type", f"'{path}' must be a non-empty list", line)
    chars = 0
    roles: list[str] = []
    for i, message in enumerate(messages):
        at = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise DatasetError("invalid_type", f"{at} must be an object", line)
        for key in ("role", "content"):
            if key not in message:
                raise DatasetError("missing_key", f"{at} is missing key '{key}'", line)
        role = message["role"]
        if role not in ROLES:
            raise DatasetError(
                "unknown_role",
                f"{at}.role {role!r} is not one of {', '.join(ROLES)}",
                line,
            )
        roles.append(role)
        chars += _require_text(
            message["content"], f"{at}.content", line, allow_empty=role == "system"
        )
    return chars, roles


def validate_chat(record: dict, line: int) -> int:
    chars, roles = _validate_messages(record["messages"], "messages", line)
    if "assistant" not in roles:
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


# Keys of an assistant message that ask for a tool: Lathe renders and trains text turns
# only, so a preference about a tool call would train as a preference about its text.
TOOL_CALL_KEYS = ("tool_calls", "function_call")


def _validate_output(output: object, key: str, line: int) -> str:
    """One side of a preference pair: a list holding the assistant's one reply (OpenAI
    trains preferences on a single turn: the last assistant message). Returns its text."""
    if not isinstance(output, list):
        raise DatasetError(
            "invalid_type", f"'{key}' must be a list holding one assistant message", line
        )
    if not output:
        raise DatasetError(
            "empty_value", f"'{key}' is empty: it must hold one assistant message", line
        )
    if len(output) > 1:
        raise DatasetError(
            "invalid_value",
            f"'{key}' holds {len(output)} messages; a preference is one assistant reply, "
            "so it must hold exactly one",
            line,
        )
    message = output[0]
    at = f"{key}[0]"
    if not isinstance(message, dict):
        raise DatasetError("invalid_type", f"{at} must be an object", line)
    for name in TOOL_CALL_KEYS:
        if name in message:
            raise DatasetError(
                "unsupported_tools",
                f"{at} has '{name}': tool calls are not supported, only text replies",
                line,
            )
    for name in ("role", "content"):
        if name not in message:
            raise DatasetError("missing_key", f"{at} is missing key '{name}'", line)
    if message["role"] != "assistant":
        raise DatasetError(
            "invalid_output_role", f"{at}.role {message['role']!r} is not 'assistant'", line
        )
    _require_text(message["content"], f"{at}.content", line)
    return message["content"]


def validate_preference(record: dict, line: int) -> int:
    prompt = record["input"]
    if not isinstance(prompt, dict):
        raise DatasetError("invalid_type", "'input' must be an object with key 'messages'", line)
    if "messages" not in prompt:
        raise DatasetError("missing_key", "missing key 'input.messages'", line)
    # OpenAI's input may declare tools; an empty list (as in its own example) declares none.
    # Tool definitions are not rendered into the prompt here, so any would be lost.
    tools = prompt.get("tools")
    if tools is not None and tools != []:
        raise DatasetError(
            "unsupported_tools",
            "'input.tools' is not supported: Lathe trains on text messages only; "
            "leave it out or empty",
            line,
        )
    parallel = prompt.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise DatasetError("invalid_type", "'input.parallel_tool_calls' must be a boolean", line)
    chars, roles = _validate_messages(prompt["messages"], "input.messages", line)
    # The outputs are the assistant's next turn, so the prompt ends where the user hands
    # over: after an assistant turn, the "reply" would be a second assistant message in a
    # row, which chat templates do not render as one turn and inference never asks for.
    if roles[-1] != "user":
        raise DatasetError(
            "invalid_value",
            f"'input.messages' must end with a user message (the outputs are the "
            f"assistant's reply to it); it ends with role {roles[-1]!r}",
            line,
        )
    preferred = _validate_output(record["preferred_output"], "preferred_output", line)
    rejected = _validate_output(record["non_preferred_output"], "non_preferred_output", line)
    if preferred == rejected:
        raise DatasetError(
            "identical_outputs",
            "'preferred_output' and 'non_preferred_output' are identical; DPO learns from "
            "the difference between them",
            line,
        )
    return chars + len(preferred) + len(rejected)


VALIDATORS = {
    DatasetFormat.CHAT: validate_chat,
    DatasetFormat.PROMPT_COMPLETION: validate_prompt_completion,
    DatasetFormat.TEXT: validate_text,
    DatasetFormat.CLASSIFICATION: validate_classification,
    DatasetFormat.PREFERENCE: validate_preference,
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
