"""Files as the API returns them: OpenAI's file object."""

from __future__ import annotations

from typing import Literal

from app import models
from app.schemas.common import ApiObject


class FileObject(ApiObject):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str  # "fine-tune" (uploaded), "fine-tune-results" (a job's adapter, metrics)
    status: str
    status_details: str | None
    expires_at: int | None = None  # always null: files are kept until deleted


def file_object(f: models.File) -> FileObject:
    return FileObject.model_validate(f)
