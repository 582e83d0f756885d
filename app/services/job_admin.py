"""Any team's job as an administrator acts on it: cancel, and mark it (not) preemptible;
audited.

The cancel is app.services.lifecycle's (its event says "by an administrator"); this adds
the admin's own not-found and conflict answers and the audit entry. The mark is read by
the scheduler's preemption (app.domain.preemption), never by the job's state machine.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain.jobs import JobKind, JobStatus, is_final
from app.errors import Conflict, NotFound
from app.models import AdminKey, Job
from app.services import audit, lifecycle
from app.services.events import add_event
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


def set_preemptible(session: Session, actor: str, job_id: str, preemptible: bool) -> Job:
    """Mark any team's fine-tuning job that has not ended preemptible or not (`actor`:
    audit.actor_of(an admin key), or audit.CLI_ACTOR). The job's owner sees it in the job
    object and an event."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.kind == JobKind.FINE_TUNE).with_for_update()
    )
    if job is None:
        raise NotFound(
            f"no fine-tuning job with id {job_id!r}", code="job_not_found", param="job_id"
        )
    if is_final(JobStatus(job.status)):
        raise Conflict(
            f"job {job.id} has already ended ({job.status}); there is nothing to preempt",
            code="job_ended",
            param="job_id",
        )
    previous = job.preemptible is not False
    job.preemptible = preemptible
    if preemptible != previous:
        add_event(
            session,
            job.pk,
            "An administrator marked the job "
            + ("preemptible" if preemptible else "not preemptible: it keeps its GPUs"),
            data={"preemptible": preemptible},
        )
    audit.record(
        session,
        actor,
        "job.update",
        job.id,
        {"team": job.team.id, "preemptible": preemptible, "was": previous},
    )
    session.commit()
    return job
