"""What waits, where, and when it will start: positions and estimates for queued jobs.

Positions come from the same fair-share policy the scheduler uses (queue_order), so a
position is the order jobs would start in if nothing new arrived; estimated starts play
that order onto the slots of the job's classes (when each frees, then a typical job
length each).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.jobs import JobStatus
from app.domain.memory import eligible_classes
from app.domain.placement import plan_placement
from app.domain.scheduling import QueuedJob, estimate_starts, queue_order, waiting_for_worker
from app.domain.workers import WorkerState
from app.models import Job, Team
from app.services.pool import (
    earmarks,
    live_workers,
    pool_classes,
    pool_hosts,
    slot_free_times,
    team_shares,
)


@dataclass(frozen=True)
class Position:
    position: int  # 1-based, among jobs that compete for the same classes
    estimated_start: int | None  # epoch seconds; None: no worker of its classes is up
    eligible: frozenset[str]
    # Why it will not start yet: no fitting worker is online, or (a multi-GPU job) it
    # waits for all its GPUs on one host, with or without a reservation.
    waiting_for: str | None = None


def typical_job_seconds(session: Session, settings: Settings) -> float:
    recent = (
        select(Job.gpu_seconds)
        .where(Job.status == JobStatus.SUCCEEDED.value, Job.gpu_seconds > 0)
        .order_by(Job.pk.desc())
        .limit(50)
        .subquery()
    )
    mean = session.scalar(select(func.avg(recent.c.gpu_seconds)))
    return float(mean) if mean else settings.typical_job_seconds


def _waiting(
    session: Session, classes: dict[str, float]
) -> tuple[list[QueuedJob], dict[int, int | None]]:
    """Queued jobs as the policy sees them, and each one's dispatch time (if sent)."""
    rows = session.execute(
        select(
            Job.pk,
            Job.team_pk,
            Job.priority,
            Job.created_at,
            Job.gpu_class,
            Job.memory_gb,
            Job.dispatched_at,
            Job.gpus,
        )
        .join(Team, Team.pk == Job.team_pk)
        .where(Job.status == JobStatus.QUEUED.value, Team.disabled.is_(False))
    ).all()
    candidates = [
        QueuedJob(
            row.pk,
            row.team_pk,
            row.priority,
            float(row.created_at),
            eligible_classes(row.gpu_class, row.memory_gb, classes),
            gpus=row.gpus or 1,
        )
        for row in rows
    ]
    return candidates, {row.pk: row.dispatched_at for row in rows}


def positions(session: Session, settings: Settings) -> dict[int, Position]:
    """Every queued job's place in line (job pk -> Position)."""
    at = time.time()
    classes = pool_classes(session, settings)
    candidates, jobs = _waiting(session, classes)
    if not candidates:
        return {}
    shares = team_shares(session, settings, at)
    order = queue_order(candidates, shares, settings.dispatch_charge_seconds)
    slots = slot_free_times(session, settings, at)
    typical = typical_job_seconds(session, settings)
    gangs = _gang_waits(session, settings, at, candidates, shares, typical, jobs)
    # Position: jobs ahead in the fair-share order that compete for one of its classes
    # (jobs that fit no known class yet wait for the same first worker: they compete).
    seen: dict[frozenset[str], int] = {}
    placed: list[tuple[QueuedJob, int]] = []
    for job in order:
        competing = sum(
            n for eligible, n in seen.items() if eligible & job.eligible or eligible == job.eligible
        )
        placed.append((job, competing + 1))
        seen[job.eligible] = seen.get(job.eligible, 0) + 1
    # Starts: one simulation per distinct set of classes, long enough for its last job.
    starts: dict[frozenset[str], list[float]] = {}
    for eligible in seen:
        deepest = max(pos for job, pos in placed if job.eligible == eligible)
        free_in = [t for c in sorted(eligible) if c in slots for t in slots[c].free_in]
        starts[eligible] = estimate_starts(deepest, free_in, typical)
    online = {c for c, slot in slots.items() if slot.workers}  # live, active workers
    result: dict[int, Position] = {}
    for job, position in placed:
        wait = starts[job.eligible][position - 1]
        dispatched = jobs[job.key]
        estimate = None if math.isinf(wait) else int(dispatched or at + wait)
        waiting_for = None if dispatched else waiting_for_worker(job.eligible, online)
        if waiting_for is None and job.key in gangs:
            waiting_for, starts_in = gangs[job.key]
            if starts_in is not None:
                estimate = int(at + starts_in)
        result[job.key] = Position(position, estimate, job.eligible, waiting_for)
    return result


def _gang_waits(
    session: Session,
    settings: Settings,
    at: float,
    candidates: list[QueuedJob],
    shares,
    typical: float,
    dispatched: dict[int, int | None],
) -> dict[int, tuple[str, float | None]]:
    """Why each waiting multi-GPU job has not started, and when its reservation starts
    (None: it has none), as the scheduler's placement sees it now."""
    if not any(job.gpus > 1 for job in candidates):
        return {}
    hosts = pool_hosts(session, settings, at, typical)
    waiting = [job for job in candidates if not dispatched[job.key]]
    plan = plan_placement(
        waiting,
        shares,
        hosts,
        typical_job_seconds=typical,
        dispatch_charge=settings.dispatch_charge_seconds,
        earmarks={pk: host for pk, (host, _) in earmarks(session).items()},
    )
    starts = {r.job: r.starts_in for r in plan.reservations}
    sizes = {job.key: job.gpus for job in waiting}
    return {
        key: (f"This job {reason}", starts.get(key))
        for key, reason in plan.waiting.items()
        if sizes[key] > 1
    }


def job_position(session: Session, settings: Settings, job: Job) -> Position | None:
    if job.status != JobStatus.QUEUED:
        return None
    return positions(session, settings).get(job.pk)


def team_queue(
    session: Session, settings: Settings, team: Team
) -> list[tuple[Job, Position | None]]:
    """The team's queued jobs with their places in line, the first to start first."""
    waiting = positions(session, settings)
    queued = session.scalars(
        select(Job)
        .where(Job.team_pk == team.pk, Job.status == JobStatus.QUEUED.value)
        .order_by(Job.created_at)
    )
    return sorted(
        ((job, waiting.get(job.pk)) for job in queued),
        key=lambda pair: pair[1].position if pair[1] else math.inf,
    )


def queue_summary(session: Session, settings: Settings) -> dict:
    """GET /v1/queue: per class (workers, busy, waiting by team) and per team."""
    at = time.time()
    classes = pool_classes(session, settings)
    teams = {t.pk: t for t in session.scalars(select(Team))}
    shares = team_shares(session, settings, at)
    workers = live_workers(session, settings, at)
    waiting = positions(session, settings)
    per_class: dict[str, dict] = {
        name: {
            "gpu_class": name,
            "memory_gb": memory,
            "workers": 0,
            "busy": 0,
            "draining": 0,
            "queued": 0,
            "queued_by_team": {},
        }
        for name, memory in sorted(classes.items())
    }
    for worker in workers:
        entry = per_class[worker.gpu_class]
        entry["workers"] += 1
        entry["busy"] += worker.current_job is not None
        entry["draining"] += worker.status != WorkerState.ACTIVE
    queued = session.execute(
        select(Job.pk, Job.team_pk).where(Job.status == JobStatus.QUEUED.value)
    ).all()
    team_rows: dict[int, dict] = {}
    for pk, team_pk in queued:
        team_id = teams[team_pk].id
        for name in waiting[pk].eligible if pk in waiting else ():
            entry = per_class.setdefault(
                name,
                {
                    "gpu_class": name,
                    "memory_gb": None,
                    "workers": 0,
                    "busy": 0,
                    "draining": 0,
                    "queued": 0,
                    "queued_by_team": {},
                },
            )
            entry["queued"] += 1
            entry["queued_by_team"][team_id] = entry["queued_by_team"].get(team_id, 0) + 1
        team_rows.setdefault(team_pk, {"queued": 0})["queued"] += 1
    running = session.execute(
        select(Job.team_pk, func.count())
        .where(Job.status == JobStatus.RUNNING.value)
        .group_by(Job.team_pk)
    ).all()
    for team_pk, n in running:
        team_rows.setdefault(team_pk, {"queued": 0})["running"] = n
    return {
        "object": "queue",
        "classes": list(per_class.values()),
        "teams": [
            {
                "team_id": teams[pk].id,
                "name": teams[pk].name,
                "weight": teams[pk].weight,
                "queued": row.get("queued", 0),
                "running": row.get("running", 0),
                "recent_gpu_seconds": round(shares[pk].recent_gpu_seconds, 1),
            }
            for pk, row in sorted(team_rows.items())
        ],
    }
