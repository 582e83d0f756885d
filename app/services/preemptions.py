"""Preemption by fair share, as one step of a scheduler pass: load the pool as
app.domain.preemption sees it, pause the victims it picks (at their next step, after a
full checkpoint: the pause every job already has), and put preempted jobs whose GPUs are
free again back in line (they keep their age, so their place).

Every preemption is an event on both jobs and an audit entry (actor "scheduler"); the
jobs' `preemptions` counts are /metrics' lathe_preemptions_total.
"""

from __future__ import annotations

from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.jobs import JobKind, JobStatus
from app.domain.memory import eligible_classes
from app.domain.preemption import (
    PreemptionPolicy,
    Running,
    Waiting,
    movable,
    plan_preemptions,
)
from app.domain.scheduling import TeamShare, normalized_usage
from app.domain.workers import WorkerState
from app.models import Job, Team
from app.services import lifecycle
from app.services.audit import record
from app.services.events import add_event
from app.services.pool import earmarks, live_workers, pool_classes, team_shares

SCHEDULER_ACTOR = "scheduler"
WAITING_PER_TEAM = 20
"""Each team's longest-waiting jobs one pass considers: preemption serves the longest
waits, and one team's deep queue cannot hide another team's waiting jobs."""


def policy_of(settings: Settings) -> PreemptionPolicy:
    return PreemptionPolicy(
        wait_seconds=settings.preemption_wait_seconds,
        max_preemptions=settings.preemption_max_per_job,
        min_run_seconds=settings.preemption_min_run_seconds,
    )


def _open_teams(shares: dict[int, TeamShare]) -> list[int]:
    """Teams that may start another job: not at their running-jobs quota, nor past their
    GPU hours for the month (team_shares gives those max_running 0). Preempting for a
    job placement would not start frees GPUs for nobody."""
    return [team for team, share in shares.items() if not share.full]


def _waiting(
    session: Session, settings: Settings, shares: dict[int, TeamShare], at: float
) -> list[Waiting]:
    """Each open, enabled team's WAITING_PER_TEAM queued fine-tunes not yet dispatched that
    have waited longest, at least the policy's wait: since creation, their last start, or
    their last preemption."""
    greatest = func.greatest if session.get_bind().dialect.name == "postgresql" else func.max
    since = greatest(
        Job.created_at, func.coalesce(Job.started_at, 0), func.coalesce(Job.preempted_at, 0)
    )
    columns = (Job.pk, Job.team_pk, Job.gpus, Job.gpu_class, Job.memory_gb, since.label("since"))
    conditions = (
        Job.status == JobStatus.QUEUED.value,
        Job.dispatched_at.is_(None),
        Job.kind == JobKind.FINE_TUNE.value,
        since <= at - settings.preemption_wait_seconds,
    )
    teams = (Team.disabled.is_(False), Team.pk.in_(_open_teams(shares)))
    order = (since, Job.pk)
    if session.get_bind().dialect.name == "postgresql":
        # Per team, a probe of its waiting jobs (ix_jobs_waiting), not a sort of the queue.
        longest = (
            select(*columns)
            .where(Job.team_pk == Team.pk, *conditions)
            .order_by(*order)
            .limit(WAITING_PER_TEAM)
            .lateral()
        )
        rows = session.execute(
            select(longest).select_from(Team).join(longest, true()).where(*teams)
        )
    else:
        ranked = (
            select(
                *columns,
                func.row_number().over(partition_by=Job.team_pk, order_by=order).label("n"),
            )
            .join(Team, Team.pk == Job.team_pk)
            .where(*teams, *conditions)
            .subquery()
        )
        rows = session.execute(select(ranked).where(ranked.c.n <= WAITING_PER_TEAM))
    classes = pool_classes(session, settings)
    return [
        Waiting(
            key=row.pk,
            team=row.team_pk,
            gpus=row.gpus or 1,
            eligible=eligible_classes(row.gpu_class, row.memory_gb, classes),
            waited=at - row.since,
        )
        for row in rows
    ]


def _running(session: Session, hosts: dict[str, str], at: float) -> list[Running]:
    """Every run holding GPUs on a live host: running ones (victims if allowed) and those
    told to stop (their GPUs are being freed)."""
    rows = session.execute(
        select(Job, Team.preemptible)
        .join(Team, Team.pk == Job.team_pk)
        .where(Job.worker.in_(list(hosts)), Job.devices.is_not(None))
    ).all()
    running = []
    for job, team_preemptible in rows:
        is_running = job.status == JobStatus.RUNNING
        running.append(
            Running(
                key=job.pk,
                team=job.team_pk,
                host=job.worker,
                gpu_class=hosts[job.worker],
                gpus=len(job.devices),
                priority=job.priority,
                ran=at - (job.started_at or at),
                started_at=float(job.started_at or at),
                preemptions=job.preemptions,
                preemptible=bool(
                    job.preemptible and team_preemptible and job.kind == JobKind.FINE_TUNE
                ),
                stopping=not is_running,
            )
        )
    return running


def preempt_for_fair_share(
    session: Session,
    settings: Settings,
    at: float,
    shares: dict[int, TeamShare] | None = None,
) -> list[str]:
    """Pause the runs the policy picks for below-share teams' waiting jobs; their ids.
    `shares`: the pass's team_shares, when it has read them already."""
    policy = policy_of(settings)
    workers = [w for w in live_workers(session, settings, at) if w.status == WorkerState.ACTIVE]
    hosts = {w.id: w.gpu_class for w in workers}
    running = _running(session, hosts, at)
    if not movable(running, policy):
        return []  # nothing may be taken: the queue is not read at all
    if shares is None:
        shares = team_shares(session, settings, at)
    waiting = _waiting(session, settings, shares, at)
    if not waiting:
        return []
    held = {w.id: 0 for w in workers}
    for run in running:
        held[run.host] += run.gpus
    host_gpus = {w.id: (w.gpu_class, w.gpus, max(0, w.gpus - held[w.id])) for w in workers}
    weights = {team.pk: team.weight for team in session.scalars(select(Team))}
    usage = normalized_usage(shares, settings.dispatch_charge_seconds)
    plans = plan_preemptions(waiting, running, host_gpus, weights, policy, usage, earmarks(session))
    preempted: list[str] = []
    for plan in plans:
        beneficiary = session.get(Job, plan.for_job)
        victims = [session.get(Job, key) for key in plan.victims]
        names = ", ".join(v.id for v in victims)
        for victim in victims:
            message = (
                f"Preempted for fair share: team {beneficiary.team.name}'s job "
                f"{beneficiary.id} has waited for {beneficiary.gpus} GPU(s) of "
                f"{victim.dispatched_class or plan.host}'s class while this team holds more "
                "than its share; the job checkpoints at its next step and resumes "
                f"automatically (preemption {victim.preemptions + 1} of at most "
                f"{settings.preemption_max_per_job})"
            )
            if not lifecycle.preempt(session, victim, message, at=at):
                continue
            preempted.append(victim.id)
            record(
                session,
                SCHEDULER_ACTOR,
                "job.preempt",
                victim.id,
                {
                    "for_job": beneficiary.id,
                    "for_team": beneficiary.team.id,
                    "team": victim.team.id,
                    "worker": plan.host,
                    "gpus": len(victim.devices or []),
                    "preemptions": victim.preemptions,
                },
            )
        beneficiary.earmarked_worker = plan.host  # placement holds the freed GPUs for it
        add_event(
            session,
            beneficiary.pk,
            f"Preempting {names} on worker {plan.host} (another team above its fair "
            f"share) to free {beneficiary.gpus} GPU(s) for this job",
        )
    return preempted


def resume_preempted(session: Session) -> list[str]:
    """Preempted jobs whose runs have stopped (their GPUs are free) go back in line."""
    stopped = session.scalars(
        select(Job).where(
            Job.status == JobStatus.PAUSED.value,
            Job.preempted_at.is_not(None),
            Job.devices.is_(None),
        )
    ).all()
    return [
        job.id
        for job in stopped
        if lifecycle.resume(session, job, "Resumed automatically after its preemption")
    ]
