"""Worker writes wait out a database restart: retry_db re-runs the transaction."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

import app.db
from app.db import retry_db


def flaky(failures: int):
    calls = []

    def write() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return "written"

    return write, calls


def test_a_write_is_retried_until_the_database_is_back(monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(app.db.time, "sleep", waits.append)
    write, calls = flaky(3)
    assert retry_db(write)() == "written"
    assert len(calls) == 4
    assert waits == [0.5, 1.0, 2.0]  # backing off


def test_past_the_deadline_the_error_surfaces(monkeypatch) -> None:
    monkeypatch.setattr(app.db.time, "sleep", lambda s: None)
    write, calls = flaky(100)
    with pytest.raises(OperationalError):
        retry_db(write, deadline_s=0.0)()
    assert len(calls) == 1


def test_other_errors_are_not_retried() -> None:
    def broken() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        retry_db(broken)()
