"""Metered GPU time per team and calendar month (UTC), for chargeback.

A job's GPU seconds are metered by its worker from claim to end (all attempts) and
count in the month the job ended; a running job counts its time so far in this month.
"""

from __future__ import annotations

import calendar
import time
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain.jobs import JobStatus
from app.domain.quotas import month_start
from app.domain.scheduling import decayed_usage
from app.errors import BadRequest
from app.models import Job, Team


def period_bounds(period: str | None, at: float | None = None) -> tuple[str, int, int]:
    """ "2026-11" -> ("2026-11", start, end) in epoch seconds; None: the current month."""
    if period is None:
        period = datetime.fromtimestamp(at or time.time(), UTC).strftime("%Y-%m")
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise BadRequest(
            f"period {period!r} is not a month; use YYYY-MM", code="invalid_period", param="period"
        ) from None
    days = calendar.monthrange(start.year, start.month)[1]
    return period, int(start.timestamp()), int(start.timestamp()) + days * 86400


def _metered_between(start: int, end: int) -> tuple:
    """Jobs whose GPU time counts in [start, end): metered, and ended in it (or, not yet
    ended, started in it)."""
    ended = func.coalesce(Job.finished_at, Job.started_at)
    return Job.gpu_seconds > 0, ended >= start, ended < end


def metered_jobs(session: Session, team: Team, period: str, limit: int) -> list[Job]:
    """The team's jobs that count in `period` (YYYY-MM), newest first."""
    _, start, end = period_bounds(period)
    return list(
        session.scalars(
            select(Job)
            .where(Job.team_pk == team.pk, *_metered_between(start, end))
            .order_by(Job.pk.desc())
            .limit(limit)
        )
    )


def usage_for(session: Session, teams: list[Team], period: str | None) -> list[dict]:
    name, start, end = period_bounds(period)
    at = time.time()
    pks = [t.pk for t in teams]
    rows = session.execute(
        select(Job.team_pk, Job.dispatched_class, func.count(), func.sum(Job.gpu_seconds))
        .where(Job.team_pk.in_(pks), *_metered_between(start, end))
        .group_by(Job.team_pk, Job.dispatched_class)
    ).all()
    running = session.execute(
        select(Job.team_pk, Job.dispatched_class, Job.started_at, Job.gpus).where(
            Job.team_pk.in_(pks), Job.status == JobStatus.RUNNING.value
        )
    ).all()
    report = {
        t.pk: {
            "object": "usage",
            "team_id": t.id,
            "team": t.name,
            "period": name,
            "gpu_seconds": 0.0,
            "jobs": 0,
            "by_gpu_class": {},
        }
        for t in teams
    }
    for team_pk, gpu_class, jobs, seconds in rows:
        entry = report[team_pk]
        entry["gpu_seconds"] += float(seconds or 0)
        entry["jobs"] += jobs
        by_class = entry["by_gpu_class"]
        by_class[gpu_class or "unknown"] = by_class.get(gpu_class or "unknown", 0.0) + float(
            seconds or 0
        )
    for team_pk, gpu_class, started_at, gpus in running:
        if started_at is None or at < start or at >= end:
            continue
        seconds = (at - max(started_at, start)) * (gpus or 1)  # N GPUs for T seconds: N*T
        entry = report[team_pk]
        entry["gpu_seconds"] += seconds
        by_class = entry["by_gpu_class"]
        by_class[gpu_class or "unknown"] = by_class.get(gpu_class or "unknown", 0.0) + seconds
    for entry in report.values():
        entry["gpu_seconds"] = round(entry["gpu_seconds"], 1)
        entry["gpu_hours"] = round(entry["gpu_seconds"] / 3600, 4)
        entry["by_gpu_class"] = {k: round(v, 1) for k, v in entry["by_gpu_class"].items()}
    return list(report.values())


def record_gpu_seconds(
    session: Session, job_id: str, seconds: float, half_life_hours: float, at: float | None = None
) -> None:
    """Meter a job's GPU time: on the job (chargeback) and, decayed, on its team (fair
    share). The team row is locked so two workers ending jobs at once both count."""
    at = time.time() if at is None else at
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job is None:
        return
    job.gpu_seconds = (job.gpu_seconds or 0.0) + seconds
    team = session.scalar(select(Team).where(Team.pk == job.team_pk).with_for_update())
    team.usage_gpu_seconds = (
        decayed_usage([(team.usage_updated_at, team.usage_gpu_seconds)], at, half_life_hours * 3600)
        + seconds
    )
    team.usage_updated_at = at


def month_gpu_seconds(session: Session, team: Team, at: float | None = None) -> float:
    """GPU seconds this calendar month (UTC): ended jobs plus running ones so far (N GPUs
    for T seconds: N*T)."""
    at = time.time() if at is None else at
    start = month_start(at)
    ended = session.scalar(
        select(func.coalesce(func.sum(Job.gpu_seconds), 0.0)).where(
            Job.team_pk == team.pk, func.coalesce(Job.finished_at, Job.started_at) >= start
        )
    )
    running = session.execute(
        select(Job.started_at, Job.gpus).where(
            Job.team_pk == team.pk, Job.status == JobStatus.RUNNING.value
        )
    ).all()
    return float(ended or 0.0) + sum(
        max(0.0, at - max(s or at, start)) * (gpus or 1) for s, gpus in running
    )
