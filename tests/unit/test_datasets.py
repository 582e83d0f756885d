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


def pair(
    messages: list | None = None,
    preferred: object = "8 + 6 = 14.",
    rejected: object = "The answer is 14, I think!",
    **extra: object,
) -> dict:
    """An OpenAI preference (DPO) line; a str output becomes one assistant message."""
    prompt = messages if messages is not None else [{"role": "user", "content": "What is 8 + 6?"}]

    def output(value: object) -> object:
        return [{"role": "assistant", "content": value}] if isinstance(value, str) else value

    record: dict = {
        "input": {"messages": prompt},
        "preferred_output": output(preferred),
        "non_preferred_output": output(rejected),
    }
    record.update(extra)
    return record


PREF = line(pair())


def test_preference_file_is_detected_and_counted() -> None:
    multi_turn = pair(
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "What is 8 + 6?"},
        ]
    )
    with_openai_extras = pair()
    with_openai_extras["input"] |= {"tools": [], "parallel_tool_calls": True}
    stats = validate_lines([PREF, b"", line(multi_turn), line(with_openai_extras)])
    assert stats.format == DatasetFormat.PREFERENCE
    assert stats.examples == 3
    # The prompt and both outputs count: 14 + 11 + 26 for the plain line.
    assert validate_lines([PREF]).characters == len("What is 8 + 6?8 + 6 = 14.") + 26


def without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize(
    ("record", "code", "fragment"),
    [
        (without(pair(), "input"), "missing_key", "missing key 'input'"),
        (
            {"messages": [{"role": "user", "content": "x"}]} | without(pair(), "input"),
            "missing_key",
            "the prompt goes in input.messages",
        ),
        (without(pair(), "preferred_output"), "missing_key", "missing key 'preferred_output'"),
        (
            without(pair(), "non_preferred_output"),
            "missing_key",
            "missing key 'non_preferred_output'",
        ),
        (
            {"input": {"messages": [{"role": "user", "content": "x"}]}},
            "missing_key",
            "'preferred_output' and 'non_preferred_output' beside 'input'",
        ),
        (pair() | {"input": "What is 8 + 6?"}, "invalid_type", "'input' must be an object"),
        (pair() | {"input": {}}, "missing_key", "missing key 'input.messages'"),
        (pair([]), "invalid_type", "'input.messages' must be a non-empty list"),
        (pair([{"role": "bot", "content": "x"}]), "unknown_role", "input.messages[0].role 'bot'"),
        (pair([{"role": "user"}]), "missing_key", "input.messages[0] is missing key 'content'"),
        (pair([{"role": "user", "content": " "}]), "empty_value", "input.messages[0].content"),
        (pair([{"role": "user", "content": 7}]), "invalid_type", "must be a string"),
        (
            pair([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
            "invalid_value",
            "must end with a user message",
        ),
        (
            pair([{"role": "system", "content": "Be brief."}]),
            "invalid_value",
            "it ends with role 'system'",
        ),
        (pair(preferred=[]), "empty_value", "'preferred_output' is empty"),
        (pair(rejected=[]), "empty_value", "'non_preferred_output' is empty"),
        (
            pair(preferred={"role": "assistant", "content": "x"}),
            "invalid_type",
            "'preferred_output' must be a list",
        ),
        (
            pair(
                preferred=[
                    {"role": "assistant", "content": "8 + 6"},
                    {"role": "assistant", "content": "= 14."},
                ]
            ),
            "invalid_value",
            "holds 2 messages",
        ),
        (pair(preferred=["8 + 6 = 14."]), "invalid_type", "preferred_output[0] must be an object"),
        (
            pair(rejected=[{"role": "user", "content": "x"}]),
            "invalid_output_role",
            "non_preferred_output[0].role 'user' is not 'assistant'",
        ),
        (
            pair(preferred=[{"role": "assistant"}]),
            "missing_key",
            "preferred_output[0] is missing key 'content'",
        ),
        (pair(preferred=""), "empty_value", "preferred_output[0].content is empty"),
        (pair(rejected="  "), "empty_value", "non_preferred_output[0].content is empty"),
        (pair(rejected=None), "invalid_type", "'non_preferred_output' must be a list"),
        (
            pair(rejected=[{"role": "assistant", "content": None}]),
            "invalid_type",
            "non_preferred_output[0].content must be a string",
        ),
        (
            pair(rejected="8 + 6 = 14."),
            "identical_outputs",
            "'preferred_output' and 'non_preferred_output' are identical",
        ),
        (
            pair(
                preferred=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "call_1"}]}]
            ),
            "unsupported_tools",
            "preferred_output[0] has 'tool_calls'",
        ),
        (
            pair() | {"input": {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}},
            "unsupported_tools",
            "'input.tools' is not supported",
        ),
        (
            pair()
            | {
                "input": {
                    "messages": [{"role": "user", "content": "x"}],
                    "parallel_tool_calls": "yes",
                }
            },
            "invalid_type",
            "'input.parallel_tool_calls' must be a boolean",
        ),
    ],
)
def test_bad_preference_lines_are_named(record: dict, code: str, fragment: str) -> None:
    err = error_for([PREF, PREF, line(record), PREF])
    assert (err.code, err.line) == (code, 3)
    assert fragment in str(err)
    assert str(err).startswith("line 3:")


def test_chat_then_preference_is_mixed_naming_both() -> None:
    err = error_for([CHAT, b"", PREF])
    assert (err.code, err.line) == ("mixed_formats", 3)
    assert 'line 1 is chat ({"messages": [...]})' in str(err)
    assert (
        'this line is preference ({"input": {"messages"}, "preferred_output", '
        '"non_preferred_output"})' in str(err)
    )


@pytest.mark.parametrize("other", [CHAT, PC, TEXT, CLS])
def test_another_format_after_preference_is_mixed(other: bytes) -> None:
    err = error_for([PREF, PREF, other])
    assert (err.code, err.line) == ("mixed_formats", 3)
    assert "line 1 is preference" in str(err)


def test_escaped_nul_in_a_preference_output_is_refused_with_its_place() -> None:
    bad = (
        rb'{"input": {"messages": [{"role": "user", "content": "x"}]},'
        rb' "preferred_output": [{"role": "assistant", "content": "a"}],'
        rb' "non_preferred_output": [{"role": "assistant", "content": "b\u0000"}]}'
    )
    err = error_for([PREF, bad])
    assert (err.code, err.line) == ("nul_character", 2)
    assert "non_preferred_output[0].content contains a NUL character" in str(err)


def test_lone_surrogate_in_a_preference_prompt_is_refused() -> None:
    bad = (
        rb'{"input": {"messages": [{"role": "user", "content": "\udc00"}]},'
        rb' "preferred_output": [{"role": "assistant", "content": "a"}],'
        rb' "non_preferred_output": [{"role": "assistant", "content": "b"}]}'
    )
    err = error_for([bad])
    assert (err.code, err.line) == ("invalid_encoding", 1)
    assert "input.messages[0].content" in str(err)
