"""A stored file as an HTTP download, streamed from object storage: the API's
GET /v1/files/{id}/content and the dashboard's result-file links send it the same way."""

from __future__ import annotations

from urllib.parse import quote

from fastapi.responses import StreamingResponse

from app.models import File
from app.storage import ObjectStore


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
