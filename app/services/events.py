"""Job events: the timeline a client reads through GET .../events."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.models import JobEvent, now


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


# Events are numbered by a sequence when inserted but become visible when committed, so
# one can appear after a later-numbered one. A streamer re-reads this many seconds back and
# skips what it already sent.
LATE_COMMIT_SECONDS = 5


def events_since(session: Session, job_pk: int, after_pk: int) -> list[JobEvent]:
    """A job's events past `after_pk`, and those of the last few seconds, oldest first."""
    recent = now() - LATE_COMMIT_SECONDS
    return list(
        session.scalars(
            select(JobEvent)
            .where(
                JobEvent.job_pk == job_pk,
                or_(JobEvent.pk > after_pk, JobEvent.created_at >= recent),
            )
            .order_by(JobEvent.pk)
        )
    )
