"""Dataset format detection and line-numbered validation errors."""

from __future__ import annotations

import json

import pytest

from app.domain.datasets import DatasetError, DatasetFormat, validate_lines


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


CHAT = line(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)
PC = line({"prompt": "2+2=", "completion": "4"})
TEXT = line({"text": "hello"})
CLS = line({"text": "great film", "label": "positive"})


@pytest.mark.parametrize(
    ("raw", "fmt"),
    [
        (CHAT, DatasetFormat.CHAT),
        (PC, DatasetFormat.PROMPT_COMPLETION),
        (TEXT, DatasetFormat.TEXT),
        (CLS, DatasetFormat.CLASSIFICATION),
    ],
)
def test_each_format_is_detected_and_counted(raw: bytes, fmt: DatasetFormat) -> None:
    stats = validate_lines([raw, raw, b""])
    assert stats.format == fmt
    assert stats.examples == 2


def error_for(lines: list[bytes]) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        validate_lines(lines)
    return info.value


@pytest.mark.parametrize(
    ("bad", "code", "fragment"),
    [
        (b'{"messages": [', "invalid_json", "invalid JSON"),
        (b"[1, 2]", "invalid_type", "JSON object"),
        (line({"prompt": "x"}), "missing_key", "'completion'"),
        (line({"input": "x"}), "missing_key", "found keys: 'input'"),
        (line({"messages": [{"role": "bot", "content": "x"}]}), "unknown_role", "'bot'"),
        (
            line({"messages": [{"role": "user", "content": "x"}]}),
            "no_assistant_message",
            "assistant",
        ),
        (line({"messages": [{"role": "assistant"}]}), "missing_key", "messages[0]"),
        (line({"messages": []}), "invalid_type", "non-empty"),
        (line({"text": ""}), "mixed_formats", "mixed formats"),
        (b"\xff\xfe", "invalid_encoding", "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "nested too deeply"),
        (b'{"text": "a", "n": ' + b"9" * 5000 + b"}", "invalid_json", "invalid JSON"),
    ],
)
def test_bad_line_is_reported_with_its_number(bad: bytes, code: str, fragment: str) -> None:
    err = error_for([CHAT, CHAT, bad, CHAT])
    assert err.code == code
    assert err.line == 3
    assert fragment in str(err)
    assert str(err).startswith("line 3:")


def test_empty_text_value_is_refused() -> None:
    err = error_for([TEXT, line({"text": "   "})])
    assert (err.code, err.line) == ("empty_value", 2)


def test_mixed_formats_name_the_first_line() -> None:
    err = error_for([b"", PC, CHAT])
    assert err.line == 3
    assert "line 2 is prompt/completion" in str(err)


def test_file_without_examples_is_empty() -> None:
    err = error_for([b"", b"  "])
    assert err.code == "empty_file"
    assert err.line is None


@pytest.mark.parametrize(
    ("record", "code", "fragment"),
    [
        ({"text": "x", "label": True}, "invalid_type", "'label' must be a string or an integer"),
        ({"text": "x", "label": 1.5}, "invalid_type", "'label' must be a string or an integer"),
        ({"text": "x", "label": " "}, "empty_value", "'label' is empty"),
        ({"text": "x", "label": "l" * 129}, "invalid_value", "longer than 128"),
        ({"label": "a"}, "missing_key", "missing key 'text' beside 'label'"),
        ({"text": "", "label": 3}, "empty_value", "'text' is empty"),
    ],
)
def test_bad_classification_lines_are_named(record: dict, code: str, fragment: str) -> None:
    error = error_for([CLS, line(record)])
    assert (error.code, error.line) == (code, 2)
    assert fragment in str(error)


def test_integer_labels_are_classes_too() -> None:
    stats = validate_lines([line({"text": "a", "label": 0}), line({"text": "b", "label": 7})])
    assert stats.format == DatasetFormat.CLASSIFICATION


def test_text_then_classification_is_mixed() -> None:
    error = error_for([TEXT, CLS])
    assert error.code == "mixed_formats" and "classification" in str(error)


@pytest.mark.parametrize(
    ("bad", "code", "fragment"),
    [
        # Escapes of what a raw byte could not carry: each parses, and would fail the job.
        (
            rb'{"text": "a\ud800b"}',
            "invalid_encoding",
            r"text contains a lone UTF-16 surrogate (\ud800)",
        ),
        (rb'{"text": "a\uDFFF"}', "invalid_encoding", r"(\udfff)"),
        (rb'{"text": "a\u0000b"}', "nul_character", r"text contains a NUL character (\u0000)"),
        (
            rb'{"messages": [{"role": "user", "content": "x"},'
            rb' {"role": "assistant", "content": "\u0000"}]}',
            "nul_character",
            "messages[1].content",
        ),
        (rb'{"text": "x", "meta": {"k\u0000": 1}}', "nul_character", "a key of meta"),
        (rb'{"text": "x", "tags": [["\udc00"]]}', "invalid_encoding", "tags[0][0]"),
    ],
)
def test_escaped_nul_and_lone_surrogates_are_refused_with_the_line(
    bad: bytes, code: str, fragment: str
) -> None:
    err = error_for([TEXT, TEXT, bad, TEXT])
    assert (err.code, err.line) == (code, 3)
    assert fragment in str(err)


def test_escapes_of_valid_text_are_accepted() -> None:
    """A surrogate pair is one character (an emoji), and an escaped backslash before
    u0000 is the six characters \\u0000, not a NUL."""
    stats = validate_lines([rb'{"text": "\ud83d\ude00 and \\u0000"}'])
    assert stats.examples == 1
