"""Any team's job as an administrator acts on it: cancel, audited.

The move is app.services.lifecycle's cancel (its event says "by an administrator"); this
adds the admin's own not-found and conflict answers and the audit entry.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain.jobs import JobStatus, is_final
from app.errors import NotFound
from app.models import AdminKey, Job
from app.services import audit, lifecycle
from app.services.jobs import not_cancellable


def cancel_job(session: Session, admin: AdminKey, job_id: str) -> Job:
    """Cancel any team's job that has not ended."""
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job is None:
        raise NotFound(
            f"no fine-tuning job with id {job_id!r}", code="job_not_found", param="job_id"
        )
    previous = job.status
    if is_final(JobStatus(previous)) or not lifecycle.cancel(session, job, actor="admin"):
        session.rollback()  # it may have ended between the read and the update
        raise not_cancellable(session.get_one(Job, job.pk), param="job_id")
    audit.record(
        session,
        audit.actor_of(admin),
        "job.cancel",
        job_id,
        {"team": job.team.id, "from": previous},
    )
    session.commit()
    return job
