"""Lathe-only views of the shared pool: /v1/workers, /v1/queue, /v1/usage, and a job's
place in line (/v1/fine_tuning/jobs/{id}/queue). Any team key may read them."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.schemas import Period, list_envelope
from app.services import jobs
from app.services.pool import team_quotas, workers_seen_by
from app.services.queue_view import job_position, queue_summary
from app.services.usage import usage_for

router = APIRouter(prefix="/v1", tags=["pool"], responses=error_responses(*COMMON_ERRORS))


@router.get("/workers")
def list_workers(team: TeamDep, session: SessionDep, settings: SettingsDep) -> dict:
    return list_envelope(workers_seen_by(session, settings, team), False)


@router.get("/queue")
def get_queue(team: TeamDep, session: SessionDep, settings: SettingsDep) -> dict:
    return queue_summary(session, settings)


@router.get("/fine_tuning/jobs/{job_id}/queue")
def job_queue(job_id: str, team: TeamDep, session: SessionDep, settings: SettingsDep) -> dict:
    job = jobs.get_job(session, team, job_id)
    place = job_position(session, settings, job)
    return {
        "object": "fine_tuning.job.queue",
        "job_id": job.id,
        "status": job.status,
        "priority": job.priority,
        "gpu_class": job.gpu_class,
        "memory_gb": job.memory_gb,
        "eligible_gpu_classes": sorted(place.eligible) if place else None,
        "position": place.position if place else None,
        "estimated_start": place.estimated_start if place else None,
        # Set while no worker of a class the job fits is online: it waits for one.
        "waiting_for": place.waiting_for if place else None,
        "estimated_finish": job.estimated_finish,
        "worker": job.worker if job.status == "running" else None,
    }


@router.get("/usage")
def get_usage(
    team: TeamDep, session: SessionDep, settings: SettingsDep, period: Period = None
) -> dict:
    report = usage_for(session, [team], period)[0]
    quota = team_quotas(team, settings).gpu_hours_per_month
    return {**report, "gpu_hours_quota": quota}
