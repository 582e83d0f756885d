"""The GPU pool as the database sees it: live workers, classes, free slots, team shares.

Read by the scheduler (what to dispatch), by job creation (does the job fit a class?)
and by the queue and workers endpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.jobs import JobStatus
from app.domain.placement import Host
from app.domain.quotas import Quotas, merge
from app.domain.scheduling import TeamShare, decayed_usage
from app.domain.workers import LIVE_STATES, WorkerState
from app.models import Job, Team, Worker
from app.schemas.pool import Worker as WorkerObject
from app.schemas.pool import worker_object
from app.services.lifecycle import busy_gpus
from app.services.usage import month_gpu_seconds


def shown_state(status: str, last_seen: float, at: float, settings: Settings) -> str:
    """A worker's state as the pool shows it: one in a live status but silent past its
    lease is `lost` already, before the scheduler's reconciler marks it so."""
    if status in LIVE_STATES and last_seen < at - settings.worker_lease_seconds:
        return WorkerState.LOST
    return status


def workers_seen_by(
    session: Session, settings: Settings, team: Team | None, at: float | None = None
) -> list[WorkerObject]:
    """Every registered worker as a team sees it (GET /v1/workers, the dashboard's pool
    page): its state as shown_state gives it, and the job it runs only when that job is
    the team's own; another team's job shows as `busy` alone. `team` None: as an
    administrator sees it (the admin pages), every job shown."""
    at = time.time() if at is None else at
    own = None
    if team is not None:
        own = set(
            session.scalars(
                select(Job.id).where(Job.team_pk == team.pk, Job.status == JobStatus.RUNNING.value)
            )
        )
    held = busy_gpus(session)
    return [
        worker_object(
            w,
            status=shown_state(w.status, w.last_seen, at, settings),
            shown_jobs=own,
            gpus_busy=held.get(w.id, 0),
        )
        for w in session.scalars(select(Worker).order_by(Worker.gpu_class, Worker.id))
    ]


def quota_defaults(settings: Settings) -> Quotas:
    return Quotas(**settings.default_quotas.model_dump())


def team_quotas(team: Team, settings: Settings) -> Quotas:
    own = Quotas(
        max_running_jobs=team.max_running_jobs,
        max_queued_jobs=team.max_queued_jobs,
        max_file_bytes=team.max_file_bytes,
        gpu_hours_per_month=team.gpu_hours_per_month,
    )
    return merge(own, quota_defaults(settings))


def live_workers(session: Session, settings: Settings, at: float | None = None) -> list[Worker]:
    at = time.time() if at is None else at
    return list(
        session.scalars(
            select(Worker)
            .where(
                Worker.status.in_(LIVE_STATES),
                Worker.last_seen >= at - settings.worker_lease_seconds,
            )
            .order_by(Worker.gpu_class, Worker.id)
        )
    )


def pool_classes(session: Session, settings: Settings) -> dict[str, float]:
    """The classes the pool knows: declared ones plus every class a worker has ever
    announced, live or not (the larger memory wins).

    Not only live ones: during a rolling restart, or in a pool scaled to zero while idle,
    no worker is up, and a job must wait for its class rather than be refused."""
    classes = dict(settings.declared_gpu_classes)
    announced = session.execute(
        select(Worker.gpu_class, func.max(Worker.memory_gb)).group_by(Worker.gpu_class)
    )
    for gpu_class, memory_gb in announced:
        classes[gpu_class] = max(classes.get(gpu_class, 0.0), float(memory_gb or 0.0))
    return classes


def online_classes(session: Session, settings: Settings, at: float | None = None) -> set[str]:
    """Classes with at least one live, active (undrained) worker: those that will take a job."""
    return {
        w.gpu_class for w in live_workers(session, settings, at) if w.status == WorkerState.ACTIVE
    }


def pending_dispatches(session: Session) -> dict[str, int]:
    """Jobs sent to a worker that no worker has claimed yet, per class."""
    rows = session.execute(
        select(Job.dispatched_class, func.count())
        .where(Job.dispatched_at.is_not(None), Job.status == JobStatus.QUEUED.value)
        .group_by(Job.dispatched_class)
    )
    return {cls: n for cls, n in rows if cls}


STOPPING_SECONDS = 60.0
"""How soon a run told to stop (paused, preempted, cancelled) is expected to free its
GPUs: it stops at its next step, after a checkpoint."""


def pool_hosts(
    session: Session, settings: Settings, at: float, typical_seconds: float | None = None
) -> list[Host]:
    """Every live worker host with, for each of its GPUs, the seconds until it frees.

    A GPU held by a run frees at the run's estimated finish (else after a typical job), or
    soon if the run was told to stop; one a dispatch is waiting to claim after a typical
    job. A draining host's GPUs never free for new work (math.inf)."""
    typical = settings.typical_job_seconds if typical_seconds is None else typical_seconds
    workers = live_workers(session, settings, at)
    ids = [w.id for w in workers]
    free_in = {w.id: [0.0] * max(1, w.gpus or 1) for w in workers}
    held = session.execute(
        select(Job.worker, Job.devices, Job.status, Job.estimated_finish).where(
            Job.worker.in_(ids), Job.devices.is_not(None)
        )
    )
    for worker, devices, status, estimated_finish in held:
        if status != JobStatus.RUNNING.value:
            remaining = STOPPING_SECONDS
        elif estimated_finish:
            remaining = max(1.0, estimated_finish - at)
        else:
            remaining = typical
        gpus = free_in[worker]
        for device in devices:
            if 0 <= device < len(gpus):
                gpus[device] = remaining
    pending = session.execute(
        select(Job.dispatched_worker, Job.gpus).where(
            Job.status == JobStatus.QUEUED.value,
            Job.dispatched_at.is_not(None),
            Job.dispatched_worker.in_(ids),
        )
    )
    for worker, gpus in pending:
        slots = free_in[worker]
        for _ in range(gpus or 1):
            idle = next((i for i, t in enumerate(slots) if t <= 0), None)
            if idle is not None:
                slots[idle] = typical
    hosts = []
    for w in workers:
        gpus = free_in[w.id]
        if w.status != WorkerState.ACTIVE:
            gpus = [math.inf] * len(gpus)
        hosts.append(Host(w.id, w.gpu_class, gpus))
    return hosts


def free_slots(session: Session, settings: Settings, at: float) -> dict[str, int]:
    """Per class: free GPUs of live, undrained hosts (none held, none awaiting a claim)."""
    free: dict[str, int] = {}
    for host in pool_hosts(session, settings, at):
        if host.free_now:
            free[host.gpu_class] = free.get(host.gpu_class, 0) + host.free_now
    return free


@dataclass(frozen=True)
class ClassSlots:
    """How busy a class is: its live, active GPUs and, for each, when it frees (seconds)."""

    workers: int
    free_in: list[float]


def slot_free_times(session: Session, settings: Settings, at: float) -> dict[str, ClassSlots]:
    slots: dict[str, ClassSlots] = {}
    for host in pool_hosts(session, settings, at):
        times = [t for t in host.free_in if not math.isinf(t)]
        if not times:
            continue  # drained or draining: frees nothing
        entry = slots.get(host.gpu_class, ClassSlots(0, []))
        slots[host.gpu_class] = ClassSlots(entry.workers + 1, [*entry.free_in, *times])
    return slots


def team_shares(session: Session, settings: Settings, at: float) -> dict[int, TeamShare]:
    """Each team's weight, decayed recent GPU usage, running jobs and running quota.

    A job's dispatch is cleared when a worker claims it, so "in flight" is the running
    jobs plus those dispatched and not yet claimed (both small sets, indexed)."""
    half_life = settings.fair_share_half_life_hours * 3600
    shares: dict[int, TeamShare] = {}
    for team in session.scalars(select(Team)):
        quotas = team_quotas(team, settings)
        max_running = quotas.max_running_jobs
        # A team past its GPU-hours quota for the month gets nothing more dispatched.
        if quotas.gpu_hours_per_month is not None and quotas.out_of_gpu_hours(
            month_gpu_seconds(session, team, at)
        ):
            max_running = 0
        shares[team.pk] = TeamShare(
            team=team.pk,
            weight=team.weight if team.weight > 0 else 1.0,
            recent_gpu_seconds=decayed_usage(
                [(team.usage_updated_at, team.usage_gpu_seconds)], at, half_life
            ),
            running=[],
            max_running=max_running,
        )
    in_flight = session.execute(
        select(Job.team_pk, Job.status, Job.started_at, Job.gpus).where(
            (Job.status == JobStatus.RUNNING.value)
            | (Job.dispatched_at.is_not(None) & (Job.status == JobStatus.QUEUED.value))
        )
    )
    for team_pk, status, started_at, gpus in in_flight:
        elapsed = at - started_at if status == JobStatus.RUNNING.value and started_at else 0.0
        if team_pk in shares:
            shares[team_pk].running.append(max(0.0, elapsed))
            shares[team_pk].running_gpus.append(gpus or 1)
    return shares


def earmarks(session: Session) -> dict[int, tuple[str, int]]:
    """Waiting jobs a preemption is freeing GPUs for (a handful, ix_jobs_earmarked):
    job pk -> (the host, the job's GPUs)."""
    rows = session.execute(
        select(Job.pk, Job.earmarked_worker, Job.gpus).where(
            Job.earmarked_worker.is_not(None),
            Job.status == JobStatus.QUEUED.value,
            Job.dispatched_at.is_(None),
        )
    )
    return {row.pk: (row.earmarked_worker, row.gpus or 1) for row in rows}
