"""/v1/files: upload, list, retrieve, download and delete a team's files."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, StoreDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.models import File
from app.schemas import file_object, list_envelope
from app.services import files
from app.services.idempotency import fingerprint, idempotent
from app.services.pool import team_quotas
from app.storage import ObjectStore

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(*COMMON_ERRORS))
_BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.post("", responses=error_responses(409, 413, 422))
def upload_file(
    team: TeamDep,
    session: SessionDep,
    objects: StoreDep,
    settings: SettingsDep,
    file: UploadFile,
    purpose: Annotated[str, Form()],
    idempotency_key: IdempotencyKeyDep = None,
) -> dict:
    filename = file.filename or "upload.jsonl"

    def store() -> dict:
        # Starlette spools the multipart body to a temporary file; it is read back in chunks.
        record = files.store_upload(
            session,
            objects,
            team,
            filename,
            purpose,
            file.file,
            settings.max_file_bytes,
            team_quotas(team, settings).max_file_bytes,
        )
        return file_object(record)

    # A retry with the same key and name returns the first file; the body is not compared
    # (that would mean storing it again).
    return idempotent(
        session, team, "POST /v1/files", idempotency_key, fingerprint(filename, purpose), store
    )


@router.get("")
def list_files(
    team: TeamDep,
    session: SessionDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
) -> dict:
    rows, has_more = files.list_files(session, team, purpose, limit, after)
    return list_envelope([file_object(f) for f in rows], has_more)


@router.get("/{file_id}")
def retrieve_file(file_id: str, team: TeamDep, session: SessionDep) -> dict:
    return file_object(files.get_file(session, team, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes (application/gzip for a .gz name)",
            "content": {"application/octet-stream": _BINARY, "application/gzip": _BINARY},
        }
    },
)
def file_content(file_id: str, team: TeamDep, session: SessionDep, store: StoreDep):
    return file_response(files.get_file(session, team, file_id), store)


def file_response(
    record: File, store: ObjectStore, *, other_media: str = "application/octet-stream", **headers
) -> StreamingResponse:
    """A stored file's bytes, streamed from object storage as an attachment (gzip for a .gz
    name, `other_media` otherwise)."""
    media = "application/gzip" if record.filename.endswith(".gz") else other_media
    return StreamingResponse(
        store.iter_chunks(record.storage_key),
        media_type=media,
        headers={
            "Content-Length": str(record.bytes),
            "Content-Disposition": content_disposition(record.filename),
            **headers,
        },
    )


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback plus the UTF-8 name, safe in a latin-1 header."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.delete("/{file_id}")
def delete_file(file_id: str, team: TeamDep, session: SessionDep, store: StoreDep) -> dict:
    files.delete_file(session, store, team, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
