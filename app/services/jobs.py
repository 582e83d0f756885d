"""Fine-tuning jobs: creation, the one place transitions happen, reads and cancel.

Transitions are guarded UPDATEs (WHERE status IN the allowed sources), so two processes
racing on one job (a cancel against a finishing worker, say) cannot both win.
"""

from __future__ import annotations

import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.hyperparameters import resolve
from app.domain.ids import new_id
from app.domain.jobs import JobStatus, is_final, sources_of
from app.errors import BadRequest, Conflict, NotFound
from app.models import Checkpoint, File, Job, JobEvent, Team, now
from app.schemas import JobCreate
from app.services.events import add_event
from app.services.pagination import newest_first_page


def transition(
    session: Session,
    job: Job,
    target: JobStatus,
    message: str,
    *,
    level: str = "info",
    data: dict | None = None,
    **fields: object,
) -> bool:
    """Move `job` to `target` if its current state allows; write the event. No commit."""
    sources = [s.value for s in sources_of(target)]
    result = session.execute(
        update(Job)
        .where(Job.pk == job.pk, Job.status.in_(sources))
        .values(status=target.value, **fields)
        .execution_options(synchronize_session=False)
    )
    session.expire(job)  # re-read on next access, whichever way the race went
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job.pk, message, level=level, data=data)
    return True


def _job_file(session: Session, team: Team, file_id: str, param: str) -> File:
    record = session.scalar(select(File).where(File.id == file_id, File.team_pk == team.pk))
    if record is None:
        raise BadRequest(f"{param} {file_id!r} does not exist", code="file_not_found", param=param)
    if record.purpose != "fine-tune":
        raise BadRequest(
            f"{param} {file_id!r} has purpose {record.purpose!r}; it must be 'fine-tune'",
            code="invalid_file_purpose",
            param=param,
        )
    return record


def dataset_problem(training: File, validation: File | None) -> dict | None:
    """Why these files cannot train together (an OpenAI-style error), or None."""
    if validation is not None and validation.format != training.format:
        return {
            "code": "invalid_validation_file",
            "param": "validation_file",
            "message": f"the validation file is {validation.format} but the training file is "
            f"{training.format}; both must have the same format",
        }
    return None


def create_job(session: Session, settings: Settings, team: Team, body: JobCreate) -> Job:
    base = settings.base_model(body.model)
    if base is None:
        names = ", ".join(m.name for m in settings.base_models)
        raise BadRequest(
            f"model {body.model!r} is not available for fine-tuning here; available: {names}",
            code="model_not_found",
            param="model",
        )
    training = _job_file(session, team, body.training_file, "training_file")
    validation = (
        _job_file(session, team, body.validation_file, "validation_file")
        if body.validation_file
        else None
    )
    requested = body.requested_hyperparameters()
    hp = resolve(
        requested.n_epochs,
        requested.batch_size,
        requested.learning_rate_multiplier,
        examples=training.examples or 0,
    )
    lora = body.lora.model_dump()
    lora["target_modules"] = lora["target_modules"] or list(base.target_modules)
    job = Job(
        id=new_id("ftjob"),
        team_pk=team.pk,
        model=base.name,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        status=JobStatus.VALIDATING_FILES.value,
        hyperparameters={
            "n_epochs": hp.n_epochs,
            "batch_size": hp.batch_size,
            "learning_rate_multiplier": hp.learning_rate_multiplier,
        },
        lora=lora,
        quantization=body.quantization.model_dump(),
        max_seq_length=body.max_seq_length,
        data_format=training.format,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata_=body.metadata,
        result_files=[],
    )
    session.add(job)
    session.flush()
    add_event(
        session,
        job.pk,
        f"Validating training file: {training.id}",
        data={
            "lora": job.lora,
            "quantization": job.quantization,
            "max_seq_length": job.max_seq_length,
        },
    )
    problem = dataset_problem(training, validation)
    if problem:
        transition(
            session,
            job,
            JobStatus.FAILED,
            f"Job failed: {problem['message']}",
            level="error",
            error=problem,
            finished_at=now(),
        )
    else:
        transition(
            session,
            job,
            JobStatus.QUEUED,
            f"Files validated ({training.examples} {training.format} examples); job queued",
        )
    session.commit()
    return job


def get_job(session: Session, team: Team, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.team_pk == team.pk))
    if job is None:
        raise NotFound(
            f"no fine-tuning job with id {job_id!r}",
            code="job_not_found",
            param="fine_tuning_job_id",
        )
    return job


def list_jobs(session: Session, team: Team, limit: int, after: str | None):
    return newest_first_page(session, Job, Job.team_pk == team.pk, limit, after)


def _not_cancellable(job: Job) -> Conflict:
    return Conflict(
        f"job {job.id} has already ended ({job.status}); it cannot be cancelled",
        code="job_not_cancellable",
        param="fine_tuning_job_id",
    )


def cancel_job(session: Session, team: Team, job_id: str) -> Job:
    job = get_job(session, team, job_id)
    if is_final(JobStatus(job.status)):
        raise _not_cancellable(job)
    if not transition(
        session, job, JobStatus.CANCELLED, "Fine-tuning job cancelled", finished_at=now()
    ):
        session.rollback()  # it ended between the read and the update
        raise _not_cancellable(get_job(session, team, job_id))
    session.commit()
    return job


def list_events(session: Session, team: Team, job_id: str, limit: int, after: str | None):
    job = get_job(session, team, job_id)
    return newest_first_page(session, JobEvent, JobEvent.job_pk == job.pk, limit, after)


def list_checkpoints(session: Session, team: Team, job_id: str, limit: int, after: str | None):
    job = get_job(session, team, job_id)
    return newest_first_page(session, Checkpoint, Checkpoint.job_pk == job.pk, limit, after)
