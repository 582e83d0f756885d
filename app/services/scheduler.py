"""One scheduler pass: reconcile the pool, then dispatch queued jobs to free GPU slots.

Late dispatch: a job waits in Postgres as `queued` and is sent to one worker host's own
Celery queue only when that host has all the GPUs the job asks for free, so the decision
(fair share, app.domain.scheduling; gang placement with reservations and backfill,
app.domain.placement) is taken at the last moment, with the latest usage. Then, if
enabled, preemption by fair share (app.services.preemptions), and preempted jobs whose
GPUs are free again go back in line. Each dispatch bumps the job's fencing
token; the task carries it and the worker's claim requires it, so a task re-sent after a
timeout, or redelivered by the broker, can never start the job twice.

Passes are serialised across processes with a Postgres advisory lock, so any number of
API replicas or `lathe scheduler` processes may run them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import case, func, or_, select, text, true, update
from sqlalchemy.orm import Session, sessionmaker

from app.broker import send_training_task, tasks_in_broker, worker_queue
from app.config import Settings
from app.domain.jobs import JobStatus
from app.domain.memory import eligible_classes
from app.domain.placement import Host, plan_placement
from app.domain.scheduling import QueuedJob
from app.domain.workers import LIVE_STATES, WorkerState
from app.models import Job, Team, Worker
from app.services import lifecycle
from app.services.idempotency import purge_expired
from app.services.pool import earmarks, pool_classes, pool_hosts, team_shares
from app.services.preemptions import preempt_for_fair_share, resume_preempted
from app.services.queue_view import typical_job_seconds

log = logging.getLogger(__name__)
SCHEDULER_LOCK = 0x1A7E  # pg advisory lock key: one pass at a time, pool-wide

PRIORITY_RANK = case((Job.priority == "high", 0), (Job.priority == "normal", 1), else_=2)


@dataclass
class PassResult:
    dispatched: list[tuple[str, str]] = field(default_factory=list)  # (job id, class)
    placed_on: dict[str, str] = field(default_factory=dict)  # job id -> worker host
    lost_workers: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)  # lost by the broker
    preempted: list[str] = field(default_factory=list)  # paused for another team's job
    resumed: list[str] = field(default_factory=list)  # preempted, back in line
    skipped: bool = False  # another process held the lock


def _try_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite: one embedded process
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SCHEDULER_LOCK}))


def reconcile_workers(session: Session, settings: Settings, at: float, result: PassResult) -> None:
    """Workers silent past their lease are lost; their running jobs go back in line, as
    do jobs still running on a worker that stopped, and GPUs held by runs on such workers
    are freed. A loss counts toward the job's
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
    # A run that was stopping (paused, cancelled) or ended on a worker that is not live
    # (lost, stopped, or its row gone) is over: it holds no GPU any more, whatever its
    # release did or did not write. Running jobs there are put back in line below.
    live = select(Worker.id).where(Worker.status.in_(LIVE_STATES))
    session.execute(
        update(Job)
        .where(
            Job.devices.is_not(None),
            Job.status != JobStatus.RUNNING.value,
            or_(Job.worker.is_(None), Job.worker.not_in(live)),
        )
        .values(devices=None)
        .execution_options(synchronize_session="fetch")
    )
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
        select(Job.pk, Job.id, Job.dispatched_worker, Job.dispatch_token).where(
            Job.status == JobStatus.QUEUED.value,
            Job.dispatched_at.is_not(None),
            Job.dispatched_at < at - settings.broker_check_seconds,
        )
    ).all()
    if not waiting:
        return
    try:
        queues = sorted({worker_queue(row.dispatched_worker or "") for row in waiting})
        held = tasks_in_broker(celery, queues)
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
    columns = (
        Job.pk,
        Job.team_pk,
        Job.priority,
        Job.created_at,
        Job.gpu_class,
        Job.memory_gb,
        Job.gpus,
    )
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


def _earmarked(session: Session):
    """Waiting jobs a preemption is freeing GPUs for (few: one per preemption)."""
    return session.execute(
        select(
            Job.pk,
            Job.team_pk,
            Job.priority,
            Job.created_at,
            Job.gpu_class,
            Job.memory_gb,
            Job.gpus,
        )
        .join(Team, Team.pk == Job.team_pk)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.dispatched_at.is_(None),
            Job.earmarked_worker.is_not(None),
            Team.disabled.is_(False),
        )
    )


def drop_stale_earmarks(session: Session, hosts: list[Host]) -> None:
    """An earmark on a host that will not free its GPUs (gone, lost, draining) holds
    nothing for its job any more: the job is placed as any other."""
    usable = [h.id for h in hosts if any(not math.isinf(t) for t in h.free_in)]
    session.execute(
        update(Job)
        .where(Job.earmarked_worker.is_not(None), Job.earmarked_worker.not_in(usable))
        .values(earmarked_worker=None)
        .execution_options(synchronize_session=False)
    )


def load_candidates(
    session: Session, classes: dict[str, float], free: dict[str, int]
) -> list[QueuedJob]:
    """The jobs one pass chooses among (not all 10,000 in line), with their classes: each
    team's best, and every job a preemption is freeing GPUs for."""
    rows = {row.pk: row for row in _best_per_team(session, classes, free)}
    rows.update((row.pk, row) for row in _earmarked(session))
    return [
        QueuedJob(
            key=row.pk,
            team=row.team_pk,
            priority=row.priority,
            created_at=float(row.created_at),
            eligible=eligible_classes(row.gpu_class, row.memory_gb, classes),
            gpus=row.gpus or 1,
        )
        for row in rows.values()
    ]


def schedule_once(
    sessions: sessionmaker[Session], settings: Settings, celery: Celery
) -> PassResult:
    at = time.time()
    result = PassResult()
    sent: list[tuple[str, int, str, str]] = []
    with sessions() as session:
        if not _try_lock(session):
            result.skipped = True
            return result
        reconcile_workers(session, settings, at, result)
        expire_dispatches(session, settings, at)
        reconcile_broker(session, settings, celery, at, result)
        purge_expired(session, at)
        typical = typical_job_seconds(session, settings)
        hosts = pool_hosts(session, settings, at, typical)
        drop_stale_earmarks(session, hosts)
        shares = None
        free: dict[str, int] = {}
        for host in hosts:
            if host.free_now:
                free[host.gpu_class] = free.get(host.gpu_class, 0) + host.free_now
        if free:
            classes = pool_classes(session, settings)
            candidates = load_candidates(session, classes, free)
            if candidates:
                shares = team_shares(session, settings, at)
                smallest_first = sorted(classes, key=lambda name: (classes[name], name))
                placement = plan_placement(
                    candidates,
                    shares,
                    hosts,
                    typical_job_seconds=typical,
                    dispatch_charge=settings.dispatch_charge_seconds,
                    class_order=smallest_first,
                    earmarks={pk: host for pk, (host, _) in earmarks(session).items()},
                )
                host_class = {host.id: host.gpu_class for host in hosts}
                for job, host_id in placement.started:
                    gpu_class = host_class[host_id]
                    sending = lifecycle.dispatch(
                        session, job.key, gpu_class=gpu_class, worker=host_id, at=at
                    )
                    if sending is not None:
                        sent.append((*sending, gpu_class, host_id))
        if settings.preemption_enabled:
            result.preempted = preempt_for_fair_share(session, settings, at, shares)
        result.resumed = resume_preempted(session)
        session.commit()
    # Sent after the commit, so the worker's claim sees the token. A crash in between
    # leaves a dispatch nobody claims, which expire_dispatches takes back.
    for job_id, token, gpu_class, host_id in sent:
        try:
            send_training_task(celery, job_id, token, host_id)
            result.dispatched.append((job_id, gpu_class))
            result.placed_on[job_id] = host_id
        except Exception:
            log.exception("could not send %s to the broker; it will be dispatched again", job_id)
            with sessions() as session:
                lifecycle.recall_dispatches(
                    session, Job.id == job_id, Job.dispatch_token == token, new_token=False
                )
                session.commit()
    if (
        result.dispatched
        or result.requeued
        or result.lost_workers
        or result.redispatched
        or result.preempted
        or result.resumed
    ):
        log.info("scheduler pass: %s", result)
    return result
