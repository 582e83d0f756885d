"""What the admin pages show, laid out from the services the admin API and the pool use:
teams with their quotas and this month's usage, every worker as an administrator sees it,
and the whole queue with every team's jobs, their places in line and why they wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.jobs import JobStatus
from app.domain.quotas import Quotas
from app.models import Job, Team
from app.services.pool import team_quotas
from app.services.queue_view import Position, positions
from app.services.team_admin import QUOTA_FIELDS
from app.services.usage import usage_for

QUEUE_SHOWN = 200  # waiting jobs listed; the count says how many more


@dataclass(frozen=True)
class TeamRow:
    team: Team
    quotas: Quotas  # in force: the team's own, else the deployment's default
    own: dict[str, bool]  # quota name -> set on the team itself (not the default)
    gpu_hours: float  # metered this month (UTC), running jobs so far included
    over: bool  # at or past its monthly GPU hours


def team_rows(session: Session, settings: Settings, teams: list[Team]) -> list[TeamRow]:
    usage = {u["team_id"]: u for u in usage_for(session, teams, None)} if teams else {}
    rows = []
    for team in teams:
        quotas = team_quotas(team, settings)
        used = usage[team.id]["gpu_seconds"]
        rows.append(
            TeamRow(
                team,
                quotas,
                {name: getattr(team, name) is not None for name in QUOTA_FIELDS},
                used / 3600,
                quotas.out_of_gpu_hours(used),
            )
        )
    return rows


@dataclass(frozen=True)
class QueueRow:
    job: Job
    team: Team
    place: Position | None  # None: not in line (its team is disabled)


@dataclass(frozen=True)
class TeamLoad:
    team: Team
    queued: int
    running: int
    max_running: int | None  # the scheduler skips the team while it runs this many


@dataclass(frozen=True)
class WholeQueue:
    waiting: list[QueueRow]  # the first QUEUE_SHOWN, by place in line
    waiting_total: int
    running: list[QueueRow]
    teams: list[TeamLoad]


def whole_queue(session: Session, settings: Settings) -> WholeQueue:
    """Every team's queued and running jobs. Places come from app.services.queue_view, the
    scheduler's own fair-share order, as GET /v1/fine_tuning/jobs/{id}/queue gives them."""
    places = positions(session, settings)
    teams = {t.pk: t for t in session.scalars(select(Team))}
    # The order needs every queued job's place, but only the rows shown are loaded whole.
    queued = session.execute(
        select(Job.pk, Job.created_at).where(Job.status == JobStatus.QUEUED.value)
    ).all()

    def order(row) -> tuple[float, float, float]:
        place = places.get(row.pk)
        if place is None:
            return (math.inf, math.inf, row.created_at)
        return (place.position, place.estimated_start or math.inf, row.created_at)

    shown = [row.pk for row in sorted(queued, key=order)[:QUEUE_SHOWN]]
    jobs = {j.pk: j for j in session.scalars(select(Job).where(Job.pk.in_(shown)))}
    waiting = [QueueRow(jobs[pk], teams[jobs[pk].team_pk], places.get(pk)) for pk in shown]
    running = [
        QueueRow(j, teams[j.team_pk], None)
        for j in session.scalars(
            select(Job).where(Job.status == JobStatus.RUNNING.value).order_by(Job.started_at)
        )
    ]
    counts = session.execute(
        select(Job.team_pk, Job.status, func.count())
        .where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
        .group_by(Job.team_pk, Job.status)
    ).all()
    load: dict[int, dict[str, int]] = {}
    for team_pk, status, n in counts:
        load.setdefault(team_pk, {})[status] = n
    return WholeQueue(
        waiting,
        len(queued),
        running,
        [
            TeamLoad(
                teams[pk],
                n.get(JobStatus.QUEUED.value, 0),
                n.get(JobStatus.RUNNING.value, 0),
                team_quotas(teams[pk], settings).max_running_jobs,
            )
            for pk, n in sorted(load.items(), key=lambda item: teams[item[0]].name)
        ],
    )
