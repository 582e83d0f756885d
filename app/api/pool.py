"""Lathe-only views of the shared pool: /v1/workers, /v1/queue, /v1/usage, and a job's
place in line (/v1/fine_tuning/jobs/{id}/queue). Any team key may read them."""

from __future__ import annotations

import time

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep, TeamDep
from app.api.error_handlers import COMMON_ERRORS, error_responses
from app.models import Job, Worker
from app.schemas import Period, list_envelope
from app.services import jobs
from app.services.pool import shown_state, team_quotas
from app.services.queue_view import job_position, queue_summary
from app.services.usage import usage_for

router = APIRouter(prefix="/v1", tags=["pool"], responses=error_responses(*COMMON_ERRORS))


@router.get("/workers")
def list_workers(team: TeamDep, session: SessionDep, settings: SettingsDep) -> dict:
    at = time.time()
    own = set(
        session.scalars(select(Job.id).where(Job.team_pk == team.pk, Job.status == "running"))
    )
    rows = session.scalars(select(Worker).order_by(Worker.gpu_class, Worker.id)).all()
    data = []
    for w in rows:
        data.append(
            {
                "id": w.id,
                "object": "worker",
                "host": w.host,
                "gpu_name": w.gpu_name,
                "gpu_class": w.gpu_class,
                "memory_gb": w.memory_gb,
                "status": shown_state(w.status, w.last_seen, at, settings),
                "busy": w.current_job is not None,
                # Another team's job id is not shown, only that the worker is busy.
                "current_job": w.current_job if w.current_job in own else None,
                "jobs_done": w.jobs_done,
                "started_at": w.started_at,
                "last_seen": int(w.last_seen),
            }
        )
    return list_envelope(data, False)


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
