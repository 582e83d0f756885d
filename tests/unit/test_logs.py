"""app.logs: one record is one line in the text format, whatever a client puts in a path;
the JSON format keeps the client's characters, escaped by JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.logs import RequestContextMiddleware, access_log, make_handler

FORGED = "2026-11-30 13:00:00,000 WARNING lathe.audit: admin key created for mallory"
# A URL-encoded CR/LF (and an ESC, a terminal's escape sequence) ahead of a forged record.
ATTACK = "/v1/fine_tuning/jobs/ftjob-1%0d%0a" + FORGED.replace(" ", "%20") + "%1b%5b2J"


async def ok(request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.fixture(params=["text", "json"])
def logged(request) -> Iterator[tuple[str, io.StringIO]]:
    """The access log of a small app behind RequestContextMiddleware, in either format."""
    stream = io.StringIO()
    handler = make_handler(request.param, stream)
    access_log.addHandler(handler)
    level = access_log.level
    access_log.setLevel(logging.INFO)
    try:
        yield request.param, stream
    finally:
        access_log.setLevel(level)
        access_log.removeHandler(handler)


def request_path(path: str) -> None:
    app = RequestContextMiddleware(Starlette(routes=[Route("/v1/fine_tuning/jobs/{job_id}", ok)]))
    assert TestClient(app).get(path).status_code == 200


def test_an_encoded_crlf_in_a_path_cannot_forge_an_access_log_line(logged) -> None:
    log_format, stream = logged
    request_path(ATTACK)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    if log_format == "json":
        record = json.loads(lines[0])
        # JSON keeps what the client sent, escaped by the format itself.
        assert record["path"].startswith("/v1/fine_tuning/jobs/ftjob-1\r\n" + FORGED)
        assert record["job_id"].startswith("ftjob-1\r\n")
    else:
        assert "\x1b" not in lines[0]
        # The path in the message and the job id in the context fields, both escaped.
        assert lines[0].count("ftjob-1\\r\\n2026-11-30") == 2
        assert "\\x1b[2J" in lines[0]


def test_a_traceback_keeps_its_lines_but_none_starts_a_record() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("lathe.test_logs")
    handler = make_handler("text", stream)
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad id\n" + FORGED)
        except ValueError:
            logger.exception("failed for\r\n%s", FORGED)
    finally:
        logger.removeHandler(handler)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("failed for\\r\\n" + FORGED)
    assert rest and all(line.startswith("    ") for line in rest), rest
    assert "    Traceback (most recent call last):" in rest
