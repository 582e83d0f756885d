"""/v1/fine_tuning/jobs/{id}/exports: a fine-tuned model written out as merged weights or
GGUF, by the pool (docs/exports.md). Create, list, retrieve, cancel, events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.schemas.common import EventCursor, ListPage, list_page
from app.schemas.exports import ExportCreate, ExportCursor, FineTuningJobExport, export_object
from app.schemas.jobs import FineTuningJobEvent, event_object
from app.services import exports
from app.services.idempotency import fingerprint, idempotent

router = APIRouter(
    prefix="/v1/fine_tuning/jobs/{job_id}/exports",
    tags=["exports"],
    responses=error_responses(*COMMON_ERRORS),
)
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", response_model=FineTuningJobExport, responses=error_responses(409))
def create_export(
    job_id: str,
    body: ExportCreate,
    team: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> dict:
    def create() -> dict:
        export = exports.create_export(session, settings, team, job_id, body)
        return export_object(export, job_id, {}).model_dump(mode="json")

    return idempotent(
        session,
        team,
        "POST /v1/fine_tuning/jobs/{job_id}/exports",
        idempotency_key,
        fingerprint(job_id + body.model_dump_json()),
        create,
    )


@router.get("", response_model=ListPage[FineTuningJobExport])
def list_exports(
    job_id: str, team: TeamDep, session: SessionDep, limit: Limit = 20, after: ExportCursor = None
) -> ListPage[FineTuningJobExport]:
    rows, has_more = exports.list_exports(session, team, job_id, limit, after)
    files = exports.export_files(session, team, rows)
    return list_page([export_object(e, job_id, files) for e in rows], has_more)


@router.get("/{export_id}", response_model=FineTuningJobExport)
def retrieve_export(
    job_id: str, export_id: str, team: TeamDep, session: SessionDep
) -> FineTuningJobExport:
    export = exports.get_export(session, team, job_id, export_id)
    return export_object(export, job_id, exports.export_files(session, team, [export]))


@router.post(
    "/{export_id}/cancel", response_model=FineTuningJobExport, responses=error_responses(409)
)
def cancel_export(
    job_id: str, export_id: str, team: TeamDep, session: SessionDep
) -> FineTuningJobExport:
    export = exports.cancel_export(session, team, job_id, export_id)
    return export_object(export, job_id, {})


@router.get("/{export_id}/events", response_model=ListPage[FineTuningJobEvent])
def list_export_events(
    job_id: str,
    export_id: str,
    team: TeamDep,
    session: SessionDep,
    limit: Limit = 20,
    after: EventCursor = None,
) -> ListPage[FineTuningJobEvent]:
    rows, has_more = exports.list_export_events(session, team, job_id, export_id, limit, after)
    return list_page([event_object(e) for e in rows], has_more)
