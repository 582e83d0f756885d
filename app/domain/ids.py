"""Public, prefixed identifiers for API objects (OpenAI style: file-..., ftjob-...)."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"
