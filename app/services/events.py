"""Job events: the timeline a client reads through GET .../events."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.domain.ids import new_id
from app.models import JobEvent


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
