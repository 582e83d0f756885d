"""The local object store: whole objects or nothing, keys confined to the root, and what
the sweeper needs to find."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from app.storage import LocalStore


class Failing(io.RawIOBase):
    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.calls += 1
        if self.calls > 2:
            raise OSError("client went away")
        buffer[:4] = b"data"
        return 4


def test_put_round_trips(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b", io.BytesIO(b"hello"))
    assert b"".join(store.iter_chunks("a/b")) == b"hello"


def test_failed_put_leaves_no_partial_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(OSError, match="went away"):
        store.put("files/x", Failing())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="escapes"):
        LocalStore(tmp_path / "root").put("../outside", io.BytesIO(b"x"))


def test_stale_partials_and_old_keys_are_found_for_the_sweeper(tmp_path: Path) -> None:

    store = LocalStore(tmp_path)
    store.put("teams/t/files/old", io.BytesIO(b"x"))
    store.put("teams/t/files/new", io.BytesIO(b"y"))
    stale = tmp_path / "teams" / "t" / "files" / "cut.partial"
    stale.write_bytes(b"half")
    an_hour_ago = time.time() - 3700
    for path in (stale, tmp_path / "teams" / "t" / "files" / "old"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert list(store.list_older("teams/", 3600)) == ["teams/t/files/old"]
    assert store.abort_stale_uploads(3600) == 1
    assert not stale.exists()
