"""Small JSONL datasets for API tests."""

from __future__ import annotations

import json


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def chat_rows(n: int = 12) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        }
        for i in range(n)
    ]


CHAT = jsonl(chat_rows())
PROMPT_COMPLETION = jsonl([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(12)])
