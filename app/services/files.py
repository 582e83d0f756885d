"""Uploaded files: stream to object storage while hashing and validating, in one pass."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.datasets import DatasetError, DatasetValidator
from app.domain.ids import new_id
from app.domain.jobs import FINAL_STATES
from app.domain.quotas import QuotaExceeded
from app.errors import APIError, BadRequest, NotFound, PayloadTooLarge, QuotaError
from app.models import File, Job, Team
from app.services.locks import lock_team
from app.services.pagination import newest_first_page
from app.services.pool import team_quotas
from app.storage import ObjectStore, file_key, team_prefix

UPLOAD_PURPOSES = ("fine-tune",)
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_FILENAME_CHARS = 255

log = logging.getLogger(__name__)


class TooLarge(Exception):
    pass


class ValidatingReader:
    """A file-like reader that hashes, counts and validates what passes through it.

    boto3's upload_fileobj pulls from it in chunks, so the upload is checked while it
    streams; an error raised here aborts the (multipart) upload.
    """

    def __init__(self, inner: BinaryIO, validator: DatasetValidator | None, max_bytes: int):
        self.inner = inner
        self.validator = validator
        self.max_bytes = max_bytes
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self._partial = b""

    def read(self, size: int = -1) -> bytes:
        chunk = self.inner.read(size)
        if chunk:
            self.bytes += len(chunk)
            if self.bytes > self.max_bytes:
                raise TooLarge
            self.sha256.update(chunk)
            self._feed(chunk)
        else:
            self._finish_lines()
        return chunk

    def _feed(self, chunk: bytes) -> None:
        if self.validator is None:
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self.validator.feed(line)
        if len(self._partial) > MAX_LINE_BYTES:
            raise DatasetError(
                "line_too_long",
                f"line is longer than {MAX_LINE_BYTES} bytes",
                self.validator.line + 1,
            )

    def _finish_lines(self) -> None:
        if self.validator is not None and self._partial:
            self.validator.feed(self._partial)
            self._partial = b""


@dataclass(frozen=True)
class UploadLimits:
    """An upload's size limits: the deployment's (`413 file_too_large`) and the team's
    largest-file quota (`403 quota_exceeded`), whichever is tighter."""

    max_bytes: int
    quota_bytes: int | None = None

    @property
    def bytes(self) -> int:
        return self.max_bytes if self.quota_bytes is None else min(self.max_bytes, self.quota_bytes)

    def refusal(self, body_bytes: int | None = None, *, so_far: bool = False) -> APIError:
        """The error for an upload over `bytes`: its file, found while streaming, or a
        request body of `body_bytes` (its Content-Length, or what arrived `so_far` of a
        body without one) too large to hold a file within the limit. The tighter limit is
        named: the team's quota, else the deployment's."""
        by_quota = self.quota_bytes is not None and self.quota_bytes < self.max_bytes
        limit = self.bytes
        if body_bytes is None:
            said = f"the file is larger than {limit}"
        else:
            size = f"passed {body_bytes}" if so_far else f"is {body_bytes}"
            said = f"the request body {size} bytes, too large for a file of at most {limit}"
        if by_quota:
            message = f"quota max_file_bytes exceeded: {said} bytes"
            return QuotaError(
                QuotaExceeded("max_file_bytes", limit, body_bytes or limit + 1, message)
            )
        return PayloadTooLarge(
            f"{said} bytes, the deployment's limit (LATHE_MAX_FILE_BYTES)",
            code="file_too_large",
            param="file",
        )


def upload_limits(team: Team, settings: Settings) -> UploadLimits:
    """The limits on the team's uploads: the deployment's, and the team's quota in force."""
    return UploadLimits(settings.max_file_bytes, team_quotas(team, settings).max_file_bytes)


@dataclass(frozen=True)
class StoredUpload:
    """A validated upload's object, not yet recorded (record_upload) or discarded."""

    file_id: str
    key: str
    bytes: int
    sha256: str
    format: str
    examples: int


def check_purpose(purpose: str) -> None:
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(
            f"purpose {purpose!r} is not accepted; use one of: {', '.join(UPLOAD_PURPOSES)}",
            code="invalid_purpose",
            param="purpose",
        )


def clean_filename(filename: str) -> str:
    """Only the last path component is kept ("../../x.jsonl" -> "x.jsonl"): a filename is a
    label, never a path; control characters are refused outright."""
    filename = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if (
        not filename
        or len(filename) > MAX_FILENAME_CHARS
        or any(ord(c) < 32 or ord(c) == 127 for c in filename)
    ):
        raise BadRequest(
            f"filename must be 1-{MAX_FILENAME_CHARS} characters with no control characters",
            code="invalid_filename",
            param="file",
        )
    return filename


def put_upload(
    store: ObjectStore, team: Team, stream: BinaryIO, limits: UploadLimits, filename: str
) -> StoredUpload:
    """Stream `stream` into object storage through the dataset validator, hashing and
    counting on the way; on any refusal or error nothing stays stored. `filename` names the
    file in error messages."""
    file_id = new_id("file")
    key = file_key(team.id, file_id)
    validator = DatasetValidator()
    reader = ValidatingReader(stream, validator, limits.bytes)
    try:
        store.put(key, reader)  # type: ignore[arg-type]
        reader.read()  # drain: make sure the validator saw end of file
        stats = validator.finish()
    except DatasetError as exc:
        _discard(store, key)
        raise BadRequest(
            f"invalid fine-tuning file {filename!r}: {exc}", code=exc.code, param="file"
        ) from None
    except TooLarge:
        _discard(store, key)
        raise limits.refusal() from None
    except BaseException:
        _discard(store, key)
        raise
    return StoredUpload(
        file_id=file_id,
        key=key,
        bytes=reader.bytes,
        sha256=reader.sha256.hexdigest(),
        format=stats.format.value,
        examples=stats.examples,
    )


def record_upload(
    session: Session,
    store: ObjectStore,
    team: Team,
    filename: str,
    purpose: str,
    stored: StoredUpload,
) -> File:
    """The File row of a stored upload, committed; the object is discarded if it is not."""
    record = File(
        id=stored.file_id,
        team_pk=team.pk,
        filename=filename,
        purpose=purpose,
        bytes=stored.bytes,
        sha256=stored.sha256,
        storage_key=stored.key,
        status="processed",
        format=stored.format,
        examples=stored.examples,
    )
    session.add(record)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        _discard(store, stored.key)
        raise
    return record


def discard_upload(store: ObjectStore, stored: StoredUpload) -> None:
    """Drop a stored upload that will not be recorded (a refused or replayed request)."""
    _discard(store, stored.key)


def store_upload(
    session: Session,
    store: ObjectStore,
    team: Team,
    filename: str,
    purpose: str,
    stream: BinaryIO,
    max_bytes: int,
    quota_bytes: int | None = None,
) -> File:
    """Check, store and record an upload read from `stream`; `max_bytes` is the
    deployment's limit (413), `quota_bytes` the team's largest-dataset quota (403)."""
    check_purpose(purpose)
    filename = clean_filename(filename)
    stored = put_upload(store, team, stream, UploadLimits(max_bytes, quota_bytes), filename)
    return record_upload(session, store, team, filename, purpose, stored)


def _discard(store: ObjectStore, key: str) -> None:
    """Remove a refused upload's object; a failure here must not hide the original error."""
    try:
        store.delete(key)
    except Exception:
        log.exception("could not delete refused upload %s", key)


def get_file(session: Session, team: Team, file_id: str) -> File:
    record = session.scalar(select(File).where(File.id == file_id, File.team_pk == team.pk))
    if record is None or not record.storage_key.startswith(team_prefix(team.id)):
        # The second test never fails for a row the API wrote; it makes reading another
        # team's object impossible even if a row were ever mis-scoped.
        raise NotFound(f"no file with id {file_id!r}", code="file_not_found", param="file_id")
    return record


def result_files(session: Session, team: Team, job: Job) -> dict[str, File]:
    """A job's result files (adapter.tar.gz, metrics.csv) by file name."""
    ids = [i for i in job.result_files or [] if isinstance(i, str)]
    if not ids:
        return {}
    rows = session.scalars(select(File).where(File.team_pk == team.pk, File.id.in_(ids)))
    return {f.filename: f for f in rows}


def list_files(session: Session, team: Team, purpose: str | None, limit: int, after: str | None):
    scope = File.team_pk == team.pk
    if purpose:
        scope = scope & (File.purpose == purpose)
    return newest_first_page(session, File, scope, limit, after)


def delete_file(session: Session, store: ObjectStore, team: Team, file_id: str) -> None:
    """Delete a file no unfinished job uses: as its training or validation file, or as the
    adapter it trains on from (a parent job's adapter.tar.gz). A paused job counts: its
    resume reads them again. Under the team's lock, which job creation takes too (on both
    databases), a job created meanwhile is either seen here or sees the file gone."""
    lock_team(session, team)
    record = get_file(session, team, file_id)
    unfinished = (Job.team_pk == team.pk, Job.status.not_in([s.value for s in FINAL_STATES]))
    in_use = session.scalar(
        select(Job.id).where(
            *unfinished, (Job.training_file == file_id) | (Job.validation_file == file_id)
        )
    )
    if not in_use:
        # JSON queries differ between Postgres and SQLite: the team's few unfinished
        # children are compared here.
        children = session.execute(
            select(Job.id, Job.parent).where(*unfinished, Job.parent.is_not(None))
        )
        in_use = next(
            (
                job_id
                for job_id, parent in children
                if isinstance(parent, dict) and parent.get("storage_key") == record.storage_key
            ),
            None,
        )
    if in_use:
        raise BadRequest(
            f"file {file_id} is in use by job {in_use}, which has not finished",
            code="file_in_use",
            param="file_id",
        )
    session.delete(record)
    session.commit()
    store.delete(record.storage_key)


def sweep_orphans(session: Session, store: ObjectStore, grace_seconds: float = 3600) -> int:
    """Delete what an upload interrupted by a crash left behind: unfinished multipart
    uploads / partial files, and complete file objects whose record was never committed.
    Only things older than `grace_seconds`, so uploads in progress are never touched."""
    removed = store.abort_stale_uploads(grace_seconds)
    for key in store.list_older("teams/", grace_seconds):
        team_part, _, rest = key.partition("/files/")
        if not rest or "/" in rest:
            continue  # not a file object (checkpoints live under jobs/)
        if session.scalar(select(File.pk).where(File.storage_key == key)) is None:
            store.delete(key)
            removed += 1
    return removed
