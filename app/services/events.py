"""Job events: the timeline a client reads through GET .../events."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.models import JobEvent, now
from app.services.training_metrics import METRICS_EVENT


def add_event(
    session: Session,
    job_pk: int,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict | None = None,
) -> JobEvent:
    event = JobEvent(
        id=new_id("ftevent"), job_pk=job_pk, message=message, level=level, type=type, data=data
    )
    session.add(event)
    return event


def timeline(session: Session, job_pk: int, limit: int) -> tuple[list[JobEvent], int]:
    """The job's latest `limit` events, newest first, without the per-step metrics events
    (the loss chart and metrics.csv show those; a long run has thousands), and how many
    such events there are in all."""
    shown = (JobEvent.job_pk == job_pk) & (JobEvent.type != METRICS_EVENT)
    events = session.scalars(
        select(JobEvent).where(shown).order_by(JobEvent.pk.desc()).limit(limit)
    ).all()
    return list(events), session.scalar(select(func.count()).where(shown)) or 0


# Events are numbered by a sequence when inserted but become visible when committed, so
# one can appear after a later-numbered one. A streamer re-reads this many seconds back and
# skips what it already sent.
LATE_COMMIT_SECONDS = 5


# Jobs per query in events_since_each: one OR term each, well inside SQLite's expression
# depth limit (1000).
JOBS_PER_QUERY = 100


def events_since_each(session: Session, cursors: Mapping[int, int]) -> dict[int, list[JobEvent]]:
    """Each job's events past its cursor ({job pk: after pk}), and those of the last
    LATE_COMMIT_SECONDS, oldest first: what one poll of every open event stream needs, in a
    query per JOBS_PER_QUERY jobs rather than one per stream."""
    recent = now() - LATE_COMMIT_SECONDS
    found: dict[int, list[JobEvent]] = {job_pk: [] for job_pk in cursors}
    items = sorted(cursors.items())
    for start in range(0, len(items), JOBS_PER_QUERY):
        chunk = items[start : start + JOBS_PER_QUERY]
        rows = session.scalars(
            select(JobEvent)
            .where(
                or_(
                    *(and_(JobEvent.job_pk == pk, JobEvent.pk > after) for pk, after in chunk),
                    and_(
                        JobEvent.job_pk.in_([pk for pk, _ in chunk]),
                        JobEvent.created_at >= recent,
                    ),
                )
            )
            .order_by(JobEvent.pk)
        )
        for event in rows:
            found[event.job_pk].append(event)
    return found
