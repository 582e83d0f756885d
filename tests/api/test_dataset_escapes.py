"""Uploads whose JSON escapes spell what a training file must not hold (docs/datasets.md):
refused at upload with the line, nothing stored, rather than failing the job later."""

from __future__ import annotations

import pytest

from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT


@pytest.mark.parametrize(
    ("bad", "code"),
    [(rb'{"text": "\ud800"}', "invalid_encoding"), (rb'{"text": "a\u0000"}', "nul_character")],
)
def test_an_escaped_nul_or_lone_surrogate_is_refused_at_upload_with_its_line(
    team: TeamClient, bad: bytes, code: str
) -> None:
    content = b'{"text": "fine"}\n{"text": "also fine"}\n' + bad + b"\n"
    response = team.upload(content)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "file")
    assert "line 3:" in error["message"]
    assert team.get("/v1/files").json()["data"] == []  # nothing stored


def test_a_valid_file_still_uploads(team: TeamClient) -> None:
    assert team.upload(CHAT).status_code == 200
