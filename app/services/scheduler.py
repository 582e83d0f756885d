"""One scheduler pass: reconcile the pool, then dispatch queued jobs to free GPU slots.

Late dispatch: a job waits in Postgres as `queued` and is sent to its class's Celery queue
only when a worker of that class is free, so the fair-share decision (app.domain.scheduling)
is taken at the last moment, with the latest usage. Each dispatch bumps the job's fencing
token; the task carries it and the worker's claim requires it, so a task re-sent after a
timeout, or redelivered by the broker, can never start the job twice.

Passes are serialised across processes with a Postgres advisory lock, so any number of
API replicas or `lathe scheduler` processes may run them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import case, func, or_, select, text, true
from sqlalchemy.orm import Session, sessionmaker

from app.broker import send_training_task, tasks_in_broker
from app.config import Settings
from app.domain.jobs import JobStatus
from app.domain.memory import eligible_classes
from app.domain.scheduling import QueuedJob, plan_dispatch
from app.domain.workers import LIVE_STATES, WorkerState
from app.models import Job, Team, Worker
from app.services import lifecycle
from app.services.idempotency import purge_expired
from app.services.pool import free_slots, pool_classes, team_shares

log = logging.getLogger(__name__)
SCHEDULER_LOCK = 0x1A7E  # pg advisory lock key: one pass at a time, pool-wide

PRIORITY_RANK = case((Job.priority == "high", 0), (Job.priority == "normal", 1), else_=2)


@dataclass
class PassResult:
    dispatched: list[tuple[str, str]] = field(default_factory=list)  # (job id, class)
    lost_workers: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)  # lost by the broker
    skipped: bool = False  # another process held the lock


def _try_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite: one embedded process
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SCHEDULER_LOCK}))


def reconcile_workers(session: Session, settings: Settings, at: float, result: PassResult) -> None:
    """Workers silent past their lease are lost; their running jobs go back in line, as
    do jobs still running on a worker that stopped. A loss counts toward the job's
    allowed losses (app.services.lifecycle.requeue); a stop, which an
    operator asked for, does not."""
    lost = session.scalars(
        select(Worker).where(
            Worker.status.in_(LIVE_STATES),
            Worker.last_seen < at - settings.worker_lease_seconds,
        )
    ).all()
    for worker in lost:
        worker.status = WorkerState.LOST
        worker.current_job = None
        result.lost_workers.append(worker.id)
    orphans = session.execute(
        select(Job, Worker.status)
        .join(Worker, Worker.id == Job.worker)
        .where(
            Job.status == JobStatus.RUNNING.value,
            Worker.status.in_((WorkerState.LOST, WorkerState.STOPPED)),
        )
    ).all()
    for job, worker_status in orphans:
        stopped = worker_status == WorkerState.STOPPED  # on purpose: not held against the job
        what = f"Worker {job.worker} {'stopped' if stopped else 'was lost'}"
        if lifecycle.requeue(session, job, what, at=at, counts=not stopped):
            result.requeued.append(job.id)


def expire_dispatches(session: Session, settings: Settings, at: float) -> None:
    """A dispatch no worker claimed in time (a lost message) is taken back for re-dispatch."""
    lifecycle.recall_dispatches(
        session,
        Job.status == JobStatus.QUEUED.value,
        Job.dispatched_at.is_not(None),
        Job.dispatched_at < at - settings.dispatch_timeout_seconds,
    )


def reconcile_broker(
    session: Session, settings: Settings, celery: Celery, at: float, result: PassResult
) -> None:
    """Dispatches the broker no longer holds (it lost them) are taken back for re-dispatch
    in this pass, with a new token, instead of waiting for the dispatch timeout."""
    waiting = session.execute(
        select(Job.pk, Job.id, Job.dispatched_class, Job.dispatch_token).where(
            Job.status == JobStatus.QUEUED.value,
            Job.dispatched_at.is_not(None),
            Job.dispatched_at < at - settings.broker_check_seconds,
        )
    ).all()
    if not waiting:
        return
    try:
        held = tasks_in_broker(celery, sorted({row.dispatched_class for row in waiting}))
    except Exception:  # the broker itself is down: nothing to compare with yet
        log.warning("could not inspect the broker", exc_info=True)
        return
    if held is None:
        return
    lost = [row.pk for row in waiting if (row.id, row.dispatch_token) not in held]
    if lost:
        lifecycle.recall_dispatches(session, Job.pk.in_(lost), Job.status == JobStatus.QUEUED.value)
        result.redispatched.extend(row.id for row in waiting if row.pk in lost)


def _best_per_team(session: Session, classes: dict[str, float], free: dict[str, int]):
    """Each enabled team's best waiting jobs that fit one of the free classes: as many as
    there are free slots, since that is the most one pass can give a team."""
    fits = or_(
        *(
            (Job.gpu_class == name)
            | (Job.gpu_class.is_(None) & (Job.memory_gb <= classes.get(name, 0.0)))
            for name in free
        )
    )
    waiting = (Job.status == JobStatus.QUEUED.value, Job.dispatched_at.is_(None), fits)
    columns = (Job.pk, Job.team_pk, Job.priority, Job.created_at, Job.gpu_class, Job.memory_gb)
    order = (PRIORITY_RANK, Job.created_at, Job.pk)
    slots = sum(free.values())
    if session.get_bind().dialect.name == "postgresql":
        # One short index probe per team (ix_jobs_waiting), not a sort of the whole queue.
        best = (
            select(*columns)
            .where(Job.team_pk == Team.pk, *waiting)
            .order_by(*order)
            .limit(slots)
            .lateral()
        )
        query = select(best).select_from(Team).join(best, true()).where(Team.disabled.is_(False))
        return session.execute(query)
    ranked = (
        select(
            *columns, func.row_number().over(partition_by=Job.team_pk, order_by=order).label("n")
        )
        .join(Team, Team.pk == Job.team_pk)
        .where(Team.disabled.is_(False), *waiting)
        .subquery()
    )
    return session.execute(select(ranked).where(ranked.c.n <= slots))


def load_candidates(
    session: Session, classes: dict[str, float], free: dict[str, int]
) -> list[QueuedJob]:
    """The jobs one pass chooses among (not all 10,000 in line), with their classes."""
    return [
        QueuedJob(
            key=row.pk,
            team=row.team_pk,
            priority=row.priority,
            created_at=float(row.created_at),
            eligible=eligible_classes(row.gpu_class, row.memory_gb, classes),
        )
        for row in _best_per_team(session, classes, free)
    ]


def schedule_once(
    sessions: sessionmaker[Session], settings: Settings, celery: Celery
) -> PassResult:
    at = time.time()
    result = PassResult()
    sent: list[tuple[str, int, str]] = []
    with sessions() as session:
        if not _try_lock(session):
            result.skipped = True
            return result
        reconcile_workers(session, settings, at, result)
        expire_dispatches(session, settings, at)
        reconcile_broker(session, settings, celery, at, result)
        purge_expired(session, at)
        free = free_slots(session, settings, at)
        if free:
            classes = pool_classes(session, settings)
            candidates = load_candidates(session, classes, free)
            if candidates:
                shares = team_shares(session, settings, at)
                smallest_first = sorted(classes, key=lambda name: (classes[name], name))
                for job, gpu_class in plan_dispatch(
                    candidates, shares, free, settings.dispatch_charge_seconds, smallest_first
                ):
                    sending = lifecycle.dispatch(session, job.key, gpu_class=gpu_class, at=at)
                    if sending is not None:
                        sent.append((*sending, gpu_class))
        session.commit()
    # Sent after the commit, so the worker's claim sees the token. A crash in between
    # leaves a dispatch nobody claims, which expire_dispatches takes back.
    for job_id, token, gpu_class in sent:
        try:
            send_training_task(celery, job_id, token, gpu_class)
            result.dispatched.append((job_id, gpu_class))
        except Exception:
            log.exception("could not send %s to the broker; it will be dispatched again", job_id)
            with sessions() as session:
                lifecycle.recall_dispatches(
                    session, Job.id == job_id, Job.dispatch_token == token, new_token=False
                )
                session.commit()
    if result.dispatched or result.requeued or result.lost_workers or result.redispatched:
        log.info("scheduler pass: %s", result)
    return result
