

def test_stale_partials_and_old_keys_are_found_for_the_sweeper(tmp_path: Path) -> None:
    import os
    import time

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
