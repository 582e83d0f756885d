"""A job's per-step training metrics, read back from its `metrics` events.

The worker records one event per logged step (data: step, train_loss, valid_loss, ...);
those events are the only copy until metrics.csv is published, so the dashboard's loss
chart and a resumed attempt's metrics.csv both read them here.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import JobEvent

METRICS_EVENT = "metrics"


def metrics_rows(session: Session, job_pk: int) -> list[dict]:
    """Every metrics row of the job, in the order recorded (all attempts)."""
    rows = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_pk == job_pk, JobEvent.type == METRICS_EVENT)
        .order_by(JobEvent.pk)
    )
    return [row for row in rows if isinstance(row, dict)]


def metrics_rows_up_to(session: Session, job_pk: int, step: int) -> list[dict]:
    """The job's metrics rows up to `step`, one a step in step order: the latest row of a
    step wins, should an earlier attempt have run past its last checkpoint."""
    by_step = {
        row["step"]: row
        for row in metrics_rows(session, job_pk)
        if isinstance(row.get("step"), int) and row["step"] <= step
    }
    return [by_step[s] for s in sorted(by_step)]
