"""Resumable downloads of stored files: GET /v1/files/{id}/content into `<target>.part` with
a progress bar; a later run continues from where a broken one stopped (a Range from the
part's size, If-Range on the ETag it started with); the whole is checked against the file's
SHA-256 (its ETag) before it takes the target's name.

The ETag of the download in progress is kept beside the part, in `<target>.part.etag`: a part
without one, or from another file, is never continued, so two files cannot be spliced."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from rich.progress import Progress, TaskID

from app.client.http import APIError, ClientError, LatheClient, Unreachable
from app.domain.byte_ranges import etag_digest, parse_content_range
from app.formatting import size

READ_CHUNK = 1024 * 1024


def part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def etag_path(target: Path) -> Path:
    return target.with_name(target.name + ".part.etag")


class _Part:
    """The partial file and the ETag of the version it holds the start of."""

    def __init__(self, target: Path) -> None:
        self.path, self.etag_file = part_path(target), etag_path(target)
        self.etag = self.etag_file.read_text().strip() if self.etag_file.is_file() else None
        held = self.path.stat().st_size if self.path.is_file() else 0
        self.held = held if self.etag else 0  # bytes of unknown origin are not continued

    def start_over(self, etag: str | None) -> None:
        """Empty the part for the version `etag` names (recorded before any byte lands)."""
        self.path.write_bytes(b"")
        self.held = 0
        self.etag = etag
        if etag:
            self.etag_file.write_text(etag + "\n")
        else:
            self.etag_file.unlink(missing_ok=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.etag_file.unlink(missing_ok=True)


def download_file(client: LatheClient, record: dict, target: Path, progress_bar: Progress) -> Path:
    """Download the file `record` (the API's file object) to `target`, continuing a part a
    broken run left; the finished file is checked against the ETag's SHA-256 and its size."""
    part = _Part(target)
    total = record["bytes"]
    task = progress_bar.add_task(f"downloading {record['filename']}", total=total)
    if part.held > total:  # not a start of this file
        part.start_over(None)
    if part.held < total or part.held == 0:
        try:
            _receive(client, record, part, progress_bar, task)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"the download of {record['id']} broke off after {size(part.held)} ({exc}); "
                "run the command again to continue it"
            ) from None
    _check(record, part)
    part.path.replace(target)
    part.etag_file.unlink(missing_ok=True)
    return target


def _receive(
    client: LatheClient, record: dict, part: _Part, progress_bar: Progress, task: TaskID
) -> None:
    """One request (and the presigned one it may be redirected to) appending to the part."""
    resume = {"Range": f"bytes={part.held}-", "If-Range": part.etag} if part.held else {}
    try:
        with client.stream("GET", f"/v1/files/{record['id']}/content", headers=resume) as resp:
            if resp.status_code == 307:
                _follow_redirect(resp, part, progress_bar, task)
            else:
                _write(resp, resp.headers.get("etag"), part, progress_bar, task)
    except APIError as exc:
        if exc.status != 416 or not part.held:
            raise
        # The part is not a start of the file as it is now: begin again.
        part.start_over(None)
        _receive(client, record, part, progress_bar, task)


def _follow_redirect(
    resp: httpx.Response, part: _Part, progress_bar: Progress, task: TaskID
) -> None:
    """Fetch from the presigned URL of a 307, without the team key: the URL is its own
    credential, and the key must never reach another host. Its ETag (S3's) is not the
    file's: the API's 307 carries the file's, which decides whether the part continues."""
    etag = resp.headers.get("etag")
    if part.held and etag != part.etag:
        part.start_over(etag)
    headers = {"Range": f"bytes={part.held}-"} if part.held else {}
    location = str(resp.url.join(resp.headers["location"]))
    with (
        httpx.Client(timeout=60.0) as storage,
        storage.stream("GET", location, headers=headers) as got,
    ):
        if got.status_code >= 400:
            got.read()
            raise ClientError(
                f"the storage URL the API redirected to answered {got.status_code}: "
                f"{got.text.strip()[:300]}"
            )
        _write(got, etag, part, progress_bar, task)


def _write(
    resp: httpx.Response, etag: str | None, part: _Part, progress_bar: Progress, task: TaskID
) -> None:
    """Append a 206 that starts where the part ends; a 200 (the Range ignored: the file
    changed, or the server does not do ranges) replaces the part."""
    if resp.status_code == 206:
        served = parse_content_range(resp.headers.get("content-range"))
        if served is None or served.start != part.held:
            raise ClientError(
                f"asked for bytes from {part.held} on, the server sent "
                f"{resp.headers.get('content-range')!r}; run the command again"
            )
    else:
        part.start_over(etag)
    progress_bar.update(task, completed=part.held)
    with part.path.open("ab") as out:
        for chunk in resp.iter_bytes():  # as received: a break loses no buffered bytes
            out.write(chunk)
            part.held += len(chunk)
            progress_bar.advance(task, len(chunk))


def _check(record: dict, part: _Part) -> None:
    """The part is the file: its size, and its SHA-256 against the ETag (the API's ETag is
    the file's SHA-256). A part that fails is removed: it cannot be continued either."""
    digest = hashlib.sha256()
    with part.path.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            digest.update(chunk)
    expected = etag_digest(part.etag)
    held = part.path.stat().st_size
    if held != record["bytes"] or (expected is not None and digest.hexdigest() != expected):
        part.remove()
        what = (
            f"{size(held)} instead of {size(record['bytes'])}"
            if held != record["bytes"]
            else f"SHA-256 {digest.hexdigest()}, not {expected}"
        )
        raise ClientError(f"the download of {record['id']} is not the file ({what}); removed it")
