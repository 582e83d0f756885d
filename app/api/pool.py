"""Lathe-only views of the shared pool: /v1/workers, /v1/queue, /v1/usage, and a job's
place in line (/v1/fine_tuning/jobs/{id}/queue). Any team key may read them."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.schemas.common import ListPage, Period, list_page
from app.schemas.pool import JobQueuePosition, QueueSummary, TeamUsage, Worker, queue_position
from app.services import jobs
from app.services.pool import team_quotas, workers_seen_by
from app.services.queue_view import job_position, queue_summary
from app.services.usage import usage_for

router = APIRouter(prefix="/v1", tags=["pool"], responses=error_responses(*COMMON_ERRORS))


@router.get("/workers", response_model=ListPage[Worker])
def list_workers(team: TeamDep, session: SessionDep, settings: SettingsDep) -> ListPage[Worker]:
    return list_page(workers_seen_by(session, settings, team), False)


@router.get("/queue", response_model=QueueSummary)
def get_queue(team: TeamDep, session: SessionDep, settings: SettingsDep) -> dict:
    return queue_summary(session, settings)


@router.get("/fine_tuning/jobs/{job_id}/queue", response_model=JobQueuePosition)
def job_queue(
    job_id: str, team: TeamDep, session: SessionDep, settings: SettingsDep
) -> JobQueuePosition:
    job = jobs.get_job(session, team, job_id)
    return queue_position(job, job_position(session, settings, job))


@router.get("/usage", response_model=TeamUsage)
def get_usage(
    team: TeamDep, session: SessionDep, settings: SettingsDep, period: Period = None
) -> dict:
    report = usage_for(session, [team], period)[0]
    quota = team_quotas(team, settings).gpu_hours_per_month
    return {**report, "gpu_hours_quota": quota}
