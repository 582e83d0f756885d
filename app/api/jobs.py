"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events and checkpoints."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.api.event_stream import event_cursor, stream_events
from app.schemas.common import (
    CheckpointCursor,
    EventCursor,
    JobCursor,
    LastEventId,
    ListPage,
    list_page,
)
from app.schemas.jobs import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
    JobCreate,
    checkpoint_object,
    event_object,
    job_object,
)
from app.services import jobs
from app.services.idempotency import fingerprint, idempotent

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(*COMMON_ERRORS)
)
log = logging.getLogger(__name__)
Limit = Annotated[int, Query(ge=1, le=100)]
# A server-sent event's fields (the schema of each message in a text/event-stream body).
SSE_MESSAGE = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["fine_tuning.job.event", "end", "error"]},
        "id": {"type": "string"},
        "data": {
            "type": "string",
            "description": "An event object; the job at `end`; an error envelope at `error`",
        },
        "retry": {"type": "integer", "minimum": 0},
    },
}


@router.post("", response_model=FineTuningJob, responses=error_responses(409, 422))
def create_job(
    body: JobCreate,
    team: TeamDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> dict:
    # The job waits in the database; the scheduler dispatches it when a slot is free.
    return idempotent(
        session,
        team,
        "POST /v1/fine_tuning/jobs",
        idempotency_key,
        fingerprint(body.model_dump_json()),
        # Stored as JSON for a replay (app.services.idempotency).
        lambda: job_object(jobs.create_job(session, settings, team, body), team.id).model_dump(
            mode="json"
        ),
    )


@router.get("", response_model=ListPage[FineTuningJob])
def list_jobs(
    team: TeamDep, session: SessionDep, limit: Limit = 20, after: JobCursor = None
) -> ListPage[FineTuningJob]:
    rows, has_more = jobs.list_jobs(session, team, limit, after)
    return list_page([job_object(j, team.id) for j in rows], has_more)


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, team: TeamDep, session: SessionDep) -> FineTuningJob:
    return job_object(jobs.get_job(session, team, job_id), team.id)


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=error_responses(409))
def cancel_job(job_id: str, team: TeamDep, session: SessionDep) -> FineTuningJob:
    return job_object(jobs.cancel_job(session, team, job_id), team.id)


@router.post("/{job_id}/pause", response_model=FineTuningJob, responses=error_responses(409))
def pause_job(job_id: str, team: TeamDep, session: SessionDep) -> FineTuningJob:
    return job_object(jobs.pause_job(session, team, job_id), team.id)


@router.post("/{job_id}/resume", response_model=FineTuningJob, responses=error_responses(409))
def resume_job(
    job_id: str, team: TeamDep, session: SessionDep, settings: SettingsDep
) -> FineTuningJob:
    return job_object(jobs.resume_job(session, settings, team, job_id), team.id)


@router.get(
    "/{job_id}/events",
    # The JSON page; a stream's response goes out as it is (docs/api.md).
    response_model=ListPage[FineTuningJobEvent],
    responses={
        200: {
            "content": {
                # With stream=true: one message per event, then `end` (docs/api.md).
                "text/event-stream": {"schema": SSE_MESSAGE},
            }
        }
    },
)
def list_events(
    job_id: str,
    team: TeamDep,
    session: SessionDep,
    request: Request,
    limit: Limit = 20,
    after: EventCursor = None,
    stream: bool = False,
    last_event_id: LastEventId = None,
) -> Response | ListPage[FineTuningJobEvent]:
    if stream:
        # Oldest first from `after` (or the Last-Event-ID a reconnecting client sends),
        # then live until the job ends.
        job = jobs.get_job(session, team, job_id)
        cursor = event_cursor(session, job, last_event_id or after)
        # The request's session closes when this returns (SessionDep's scope), before the
        # stream starts; the hub's polls use short sessions of their own.
        return stream_events(request, team.id, job.pk, cursor)
    rows, has_more = jobs.list_events(session, team, job_id, limit, after)
    return list_page([event_object(e) for e in rows], has_more)


@router.get("/{job_id}/checkpoints", response_model=ListPage[FineTuningJobCheckpoint])
def list_checkpoints(
    job_id: str,
    team: TeamDep,
    session: SessionDep,
    limit: Limit = 10,
    after: CheckpointCursor = None,
) -> ListPage[FineTuningJobCheckpoint]:
    rows, has_more = jobs.list_checkpoints(session, team, job_id, limit, after)
    return list_page([checkpoint_object(c, job_id) for c in rows], has_more)


@router.get("/{job_id}/checkpoints/{checkpoint_id}", response_model=FineTuningJobCheckpoint)
def retrieve_checkpoint(
    job_id: str, checkpoint_id: str, team: TeamDep, session: SessionDep
) -> FineTuningJobCheckpoint:
    return checkpoint_object(jobs.get_checkpoint(session, team, job_id, checkpoint_id), job_id)
