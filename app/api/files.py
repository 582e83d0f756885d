"""/v1/files: upload, list, retrieve, download and delete a team's files."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from anyio.lowlevel import EventLoopToken, current_token
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import Message, Receive

from app.api.deps import (
    IdempotencyKeyDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TeamBearer,
    TeamDep,
    current_team,
)
from app.api.error_handlers import COMMON_ERRORS, ErrorEnvelope, envelope, error_responses
from app.api.multipart import FormError, MultipartStream, boundary_of
from app.domain.byte_ranges import (
    Unsatisfiable,
    if_range_allows,
    requested_range,
    strong_etag,
)
from app.downloads import content_disposition
from app.errors import APIError, BadRequest
from app.models import Team
from app.schemas.common import Deleted, FileCursor, ListPage, PurposeFilter, list_page
from app.schemas.files import FileObject, file_object
from app.services import files
from app.services.idempotency import check_key, fingerprint, idempotent
from app.storage import ObjectStore

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(*COMMON_ERRORS))
_BINARY = {"schema": {"type": "string", "format": "binary"}}


# A request body may pass the file limit by this much, room for the multipart framing, the
# part headers (a filename of up to 255 characters) and the purpose field. A Content-Length
# beyond it is refused unread; a body without one is cut off there.
FRAMING_BYTES = 64 * 1024
MAX_PURPOSE_BYTES = 1024
# Uploads stream in threads of their own (object storage clients block), at most this many
# at once; more wait their turn unread, so slow uploads never take the threads that the
# other endpoints run in.
UPLOAD_THREADS = 16
BODY_IDLE_SECONDS = 60.0

UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {
                        "type": "string",
                        "contentMediaType": "application/octet-stream",
                        "description": "The dataset: JSON lines (docs/datasets.md)",
                    },
                    "purpose": {"type": "string", "enum": list(files.UPLOAD_PURPOSES)},
                },
            }
        }
    },
}


def uploading_team(request: Request, bearer: TeamBearer) -> Team:
    """The caller's team (current_team), looked up in a session that ends at once: an
    upload holds no session, nor a connection, while its body arrives (minutes, for a
    large file); it records the file in a session of its own."""
    with request.app.state.sessionmaker() as session:
        return current_team(request, session, bearer)


UploadingTeamDep = Annotated[Team, Depends(uploading_team)]


class RequestTimeout(APIError):
    status_code = 408


@router.post(
    "",
    response_model=FileObject,
    responses={
        **error_responses(409, 413, 422),
        408: {"model": ErrorEnvelope, "description": "The upload stalled"},
    },
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def upload_file(
    request: Request,
    team: UploadingTeamDep,
    objects: StoreDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> dict:
    """Upload a dataset. The key, the Content-Type and the Content-Length are checked before
    any of the body is read; the body then streams through the validator into object
    storage, cut off as soon as it passes the limit (a chunked body has no length)."""
    limits = files.upload_limits(team, settings)
    try:
        boundary = boundary_of(request.headers.get("content-type"))
    except FormError as exc:
        raise BadRequest(str(exc), code="invalid_multipart", param="file") from None
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.bytes + FRAMING_BYTES:
        raise limits.refusal(int(declared))
    if idempotency_key is not None:
        check_key(idempotency_key)
    body = _BodyChunks(request.receive, current_token(), limits, limits.bytes + FRAMING_BYTES)
    form = MultipartStream(body, boundary)
    sessions = request.app.state.sessionmaker
    receive = partial(_receive_upload, sessions, objects, team, limits, form, idempotency_key)
    return await anyio.to_thread.run_sync(receive, limiter=_upload_threads(request.app))


def _receive_upload(
    sessions: sessionmaker[Session],
    objects: ObjectStore,
    team: Team,
    limits: files.UploadLimits,
    form: MultipartStream,
    idempotency_key: str | None,
) -> dict:
    """Read the form, storing its file as it arrives; then record it, once per key."""
    purpose: str | None = None
    filename = "upload.jsonl"
    stored: files.StoredUpload | None = None
    try:
        for part in form.parts():
            if part.name == "purpose" and purpose is None:
                purpose = part.read_text(MAX_PURPOSE_BYTES)
                files.check_purpose(purpose)  # before the file, when it comes first
            elif part.name == "file" and stored is None:
                filename = files.clean_filename(part.filename or filename)
                stored = files.put_upload(objects, team, part, limits, filename)  # type: ignore[arg-type]
            # Anything else (fields Lathe does not use, a second file) is skipped.
        if stored is None:
            raise BadRequest(
                "the form has no 'file' part: send the dataset as the multipart field 'file'",
                code="invalid_value",
                param="file",
            )
        if purpose is None:
            raise BadRequest(
                "the form has no 'purpose' field: send purpose=fine-tune",
                code="invalid_value",
                param="purpose",
            )
    except FormError as exc:
        if stored is not None:
            files.discard_upload(objects, stored)
        raise BadRequest(str(exc), code="invalid_multipart", param="file") from None
    except BaseException:
        if stored is not None:
            files.discard_upload(objects, stored)
        raise
    with sessions() as session:
        return _record_once(session, objects, team, filename, purpose, stored, idempotency_key)


def _record_once(
    session: Session,
    objects: ObjectStore,
    team: Team,
    filename: str,
    purpose: str,
    stored: files.StoredUpload,
    idempotency_key: str | None,
) -> dict:
    """Record the stored upload, unless this is a retry of an upload with the same
    Idempotency-Key: then the first file is the answer and this copy is dropped. A retry
    must carry the same name, purpose and content (compared by SHA-256)."""
    recorded = False

    def record() -> dict:
        nonlocal recorded
        upload = files.record_upload(session, objects, team, filename, purpose, stored)
        response = file_object(upload).model_dump(mode="json")  # stored for a replay
        recorded = True
        return response

    try:
        return idempotent(
            session,
            team,
            "POST /v1/files",
            idempotency_key,
            fingerprint(filename, purpose, stored.sha256),
            record,
        )
    finally:
        if not recorded:
            files.discard_upload(objects, stored)


class _BodyChunks:
    """The request body's chunks for the upload's thread (or object storage's), each pulled
    from the event loop; cut off past `max_bytes` and after BODY_IDLE_SECONDS of silence."""

    def __init__(
        self, receive: Receive, token: EventLoopToken, limits: files.UploadLimits, max_bytes: int
    ) -> None:
        self._receive, self._token = receive, token
        self._limits, self._max_bytes = limits, max_bytes
        self._received = 0
        self._done = False

    def __iter__(self) -> _BodyChunks:
        return self

    def __next__(self) -> bytes:
        while not self._done:
            message = anyio.from_thread.run(self._next_message, token=self._token)
            if message["type"] == "http.disconnect":
                raise BadRequest(
                    "the client disconnected before the upload ended", code="client_disconnected"
                )
            self._done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            self._received += len(chunk)
            if self._received > self._max_bytes:
                raise self._limits.refusal(self._received, so_far=True)
            if chunk:
                return chunk
        raise StopIteration

    async def _next_message(self) -> Message:
        try:
            with anyio.fail_after(BODY_IDLE_SECONDS):
                return await self._receive()
        except TimeoutError:
            raise RequestTimeout(
                f"the upload stalled: no data for {BODY_IDLE_SECONDS:.0f} s",
                code="upload_timeout",
            ) from None


def _upload_threads(app: FastAPI) -> anyio.CapacityLimiter:
    """The app's upload threads (made on first use, in the event loop)."""
    limiter = getattr(app.state, "upload_threads", None)
    if limiter is None:
        limiter = app.state.upload_threads = anyio.CapacityLimiter(UPLOAD_THREADS)
    return limiter


@router.get("", response_model=ListPage[FileObject])
def list_files(
    team: TeamDep,
    session: SessionDep,
    purpose: PurposeFilter = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: FileCursor = None,
) -> ListPage[FileObject]:
    rows, has_more = files.list_files(session, team, purpose, limit, after)
    return list_page([file_object(f) for f in rows], has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, team: TeamDep, session: SessionDep) -> FileObject:
    return file_object(files.get_file(session, team, file_id))


RANGE_DOC = (
    "One byte range: `bytes=first-last`, `bytes=first-` or `bytes=-suffix` (206). Several "
    "ranges, or a malformed header, get the whole file (200)"
)
IF_RANGE_DOC = (
    "The ETag of the copy the client holds part of: the Range applies only if it is current"
)
_HEADER = {"schema": {"type": "string"}}
_ETAG = {"description": "The file's SHA-256, quoted: a strong validator", **_HEADER}
_ACCEPT_RANGES = {"description": "Always `bytes`", **_HEADER}


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes (application/gzip for a .gz name)",
            "content": {"application/octet-stream": _BINARY, "application/gzip": _BINARY},
            "headers": {"ETag": _ETAG, "Accept-Ranges": _ACCEPT_RANGES},
        },
        206: {
            "description": "The bytes the Range asked for",
            "content": {"application/octet-stream": _BINARY, "application/gzip": _BINARY},
            "headers": {
                "Content-Range": {"description": "`bytes first-last/size`", **_HEADER},
                "ETag": _ETAG,
                "Accept-Ranges": _ACCEPT_RANGES,
            },
        },
        307: {
            "description": "On S3 storage with LATHE_FILE_DOWNLOAD_REDIRECT_SECONDS set: a "
            "presigned URL for the bytes, valid that long (send no API key there)",
            "headers": {"Location": {"description": "The presigned URL", **_HEADER}, "ETag": _ETAG},
        },
        416: {
            "model": ErrorEnvelope,
            "description": "The Range starts at or past the end of the file",
            "headers": {"Content-Range": {"description": "`bytes */size`", **_HEADER}},
        },
    },
)
def file_content(
    file_id: str,
    team: TeamDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    range_: Annotated[str | None, Header(alias="Range", description=RANGE_DOC)] = None,
    if_range: Annotated[str | None, Header(alias="If-Range", description=IF_RANGE_DOC)] = None,
) -> Response:
    """The file's bytes, resumable: a single Range is served from storage as a 206 (S3 reads
    only that slice), with the file's SHA-256 as its ETag so If-Range keeps a resumed
    download from splicing two versions. With the redirect setting on S3 storage, the
    answer is a 307 to a presigned URL instead, and the bytes bypass the API."""
    record = files.get_file(session, team, file_id)  # another team's file: 404, Range or not
    etag = strong_etag(record.sha256)
    media = "application/gzip" if record.filename.endswith(".gz") else "application/octet-stream"
    disposition = content_disposition(record.filename)
    if settings.file_download_redirect_seconds:
        url = store.download_url(
            record.storage_key,
            settings.file_download_redirect_seconds,
            disposition=disposition,
            media_type=media,
        )
        if url is not None:  # a local store has no URLs: it streams, below
            # The URL is a credential for this object: no cache may keep the answer.
            headers = {"ETag": etag, "Cache-Control": "no-store"}
            return RedirectResponse(url, status_code=307, headers=headers)
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Content-Disposition": disposition}
    wanted = requested_range(range_, record.bytes) if if_range_allows(if_range, etag) else None
    if isinstance(wanted, Unsatisfiable):
        refusal = envelope(
            416,
            f"the range {range_[:100]!r} starts at or past the end of the file "
            f"({record.bytes} bytes)",
            "invalid_request_error",
            "range_not_satisfiable",
            "Range",
        )
        refusal.headers["Content-Range"] = wanted.content_range
        return refusal
    if wanted is None:
        chunks = store.iter_chunks(record.storage_key)
        headers["Content-Length"] = str(record.bytes)
        return StreamingResponse(chunks, media_type=media, headers=headers)
    chunks = store.iter_chunks(record.storage_key, wanted.start, wanted.stop)
    headers["Content-Length"] = str(wanted.length)
    headers["Content-Range"] = wanted.content_range
    return StreamingResponse(chunks, status_code=206, media_type=media, headers=headers)


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(file_id: str, team: TeamDep, session: SessionDep, store: StoreDep) -> Deleted:
    files.delete_file(session, store, team, file_id)
    return Deleted(id=file_id, object="file", deleted=True)
