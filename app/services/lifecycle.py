"""A job's life, as named verbs: queue, dispatch, claim, requeue, pause, resume, succeed,
fail, cancel, and the end of a run (release).

Each verb is one guarded move with everything that goes with it: the fields it resets,
the job's event, the webhook outbox row (in the same transaction) and the metering. No
verb commits: the caller owns the transaction, so a move and the caller's other writes
(an audit entry, the result files) land together or not at all.

Moves are guarded UPDATEs (WHERE status IN the allowed sources, plus any fence the
caller adds), so two processes racing on one job (a cancel against a finishing worker,
say) cannot both win; a verb returns False to the loser.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from app.domain.jobs import JobKind, JobStatus, sources_of
from app.models import File, Job, Worker, now
from app.services.events import add_event
from app.services.usage import record_gpu_seconds
from app.services.webhooks import enqueue_job_outcome

MAX_WORKER_LOSSES = 3
"""The loss of a job's worker that fails the job: a job that takes its worker down each
time (an OOM that kills the host, say) must not be re-queued forever."""

# The fields a job sheds when it leaves a dispatch, and when it leaves a worker.
UNDISPATCHED = {"dispatched_at": None, "dispatched_class": None, "dispatched_worker": None}
OFF_WORKER = {"worker": None, "estimated_finish": None, "devices": None}


def transition(
    session: Session,
    job: Job,
    target: JobStatus,
    message: str,
    *,
    level: str = "info",
    data: dict | None = None,
    fence: tuple = (),
    **fields: object,
) -> bool:
    """Move `job` to `target` if its current state allows; write the event and the
    webhook outbox rows. The primitive under every verb below. No commit.

    `fence` adds conditions to the UPDATE: a run's (run_fence), a dispatch token."""
    sources = [s.value for s in sources_of(target)]
    result = session.execute(
        update(Job)
        .where(Job.pk == job.pk, Job.status.in_(sources), *fence)
        .values(status=target.value, **fields)
        .execution_options(synchronize_session=False)
    )
    session.expire(job)  # re-read on next access, whichever way the race went
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job.pk, message, level=level, data=data)
    enqueue_job_outcome(session, job, target)  # webhooks, in this same transaction
    return True


# --- in line ------------------------------------------------------------------------------


def queue(session: Session, job: Job, *, training: File) -> bool:
    """validating_files -> queued: its files passed."""
    return transition(
        session,
        job,
        JobStatus.QUEUED,
        f"Files validated ({training.examples} {training.format} examples); job queued",
    )


def dispatch(
    session: Session, job_pk: int, *, gpu_class: str, worker: str, at: float
) -> tuple[str, int] | None:
    """Send a waiting job to `worker` (a host of `gpu_class`) and its own queue: it stays
    `queued`, marked dispatched, with a new fencing token that the task carries and the
    claim requires. Returns the job's id and token, or None if it is no longer waiting."""
    row = session.execute(
        update(Job)
        .where(
            Job.pk == job_pk,
            Job.status == JobStatus.QUEUED.value,
            Job.dispatched_at.is_(None),
        )
        .values(
            dispatched_at=int(at),
            dispatched_class=gpu_class,
            dispatched_worker=worker,
            earmarked_worker=None,  # placed: whatever was freed for it is no longer held
            dispatch_token=Job.dispatch_token + 1,
        )
        .returning(Job.id, Job.dispatch_token)
    ).first()
    return None if row is None else (row.id, row.dispatch_token)


def recall_dispatches(session: Session, *where: object, new_token: bool = True) -> None:
    """Take dispatches matching `where` back for re-dispatch (lost by the broker, never
    claimed, never sent). A new token means the lost message, should it turn up after
    all, can no longer claim its job."""
    values: dict = dict(UNDISPATCHED)
    if new_token:
        values["dispatch_token"] = Job.dispatch_token + 1
    session.execute(update(Job).where(*where).values(**values))


def claim(session: Session, job: Job, *, worker: str, token: int | None) -> bool:
    """queued -> running on `worker`, in a new attempt, holding `job.gpus` of the worker's
    devices, if the task's dispatch `token` is still the job's (None: any); the worker's
    registry row shows the job. False when the job was cancelled or paused meanwhile, the
    task is a stale or duplicate delivery, or the worker has not the GPUs free (then the
    dispatch is taken back at once, for the next scheduler pass)."""
    token_fence = () if token is None else (Job.dispatch_token == token,)
    what = "Export" if job.kind == JobKind.EXPORT else "Fine-tuning job"
    gpus = job.gpus or 1
    devices = free_devices(session, worker)
    if devices is not None and len(devices) < gpus:
        recall_dispatches(session, Job.pk == job.pk, Job.status == JobStatus.QUEUED.value)
        return False
    held = (devices or list(range(gpus)))[:gpus]
    on = f"GPU {held[0]}" if gpus == 1 else f"GPUs {', '.join(map(str, held))}"
    claimed = transition(
        session,
        job,
        JobStatus.RUNNING,
        f"{what} started on worker {worker} ({on})",
        fence=(Job.status == JobStatus.QUEUED.value, *token_fence),
        worker=worker,
        attempt=job.attempt + 1,
        started_at=now(),
        dispatched_at=None,  # claimed: no longer a dispatch waiting for a worker
        devices=held,
        preempted_at=None,
    )
    if claimed:
        _show_on_worker(session, worker, job.id)
    return claimed


def free_devices(session: Session, worker: str) -> list[int] | None:
    """The worker's device indexes no run holds, its row locked until the caller's commit
    so two claims on one host cannot take the same GPU. None when the worker has no
    registry row (a run started by hand): then the job takes devices from 0.

    The lock is a write of the row (a no-op UPDATE) before anything is read: Postgres
    locks the row as SELECT ... FOR UPDATE would, and SQLite (which ignores FOR UPDATE)
    takes its database write lock, so the second of two claims reads after the first
    committed, not from a snapshot that misses its devices."""
    gpus = session.scalar(
        update(Worker).where(Worker.id == worker).values(gpus=Worker.gpus).returning(Worker.gpus)
    )
    if gpus is None:
        return None
    held = session.scalars(
        select(Job.devices).where(Job.worker == worker, Job.devices.is_not(None))
    )
    taken = {device for devices in held for device in devices}
    return [device for device in range(gpus) if device not in taken]


def busy_gpus(session: Session, worker: str | None = None) -> dict[str, int]:
    """Per worker, the GPUs runs hold (running, or stopping after a pause or cancel)."""
    query = select(Job.worker, Job.devices).where(Job.devices.is_not(None))
    if worker is not None:
        query = query.where(Job.worker == worker)
    held: dict[str, int] = {}
    for name, devices in session.execute(query):
        held[name] = held.get(name, 0) + len(devices)
    return held


def run_fence(worker: str, attempt: int) -> tuple:
    """Conditions every write about a claimed job carries: it is still running, on this
    worker, in this attempt. A run that lost its job (its worker was declared lost and the
    job re-claimed elsewhere) can no longer fail, publish or annotate it."""
    return (
        Job.status == JobStatus.RUNNING.value,
        Job.worker == worker,
        Job.attempt == attempt,
    )


def requeue(
    session: Session, job: Job, reason: str, *, at: float | None = None, counts: bool = True
) -> bool:
    """Put a running `job` whose worker was lost, stopped or restarted back in line,
    counting the loss in `worker_losses`; the MAX_WORKER_LOSSES-th loss fails it
    `worker_lost`. `reason` says what happened ("Worker w1 was lost"). True when the job
    went back in line.

    `counts=False` for a worker an operator stopped on purpose (it marked itself
    `stopped` at shutdown): that says nothing about the job, so it is not held against it.
    A host that dies with the job (an OOM kill) never gets to say so: it is lost or
    restarts, and that counts.

    Every path that takes a running job from its worker calls this, so every loss counts
    whatever the event says. The count is in the fence, like the status: two processes
    handling one loss (the restarted worker and the scheduler) cannot both count it."""
    worker, losses = job.worker, job.worker_losses + int(counts)
    fence = (
        Job.status == JobStatus.RUNNING.value,  # not one paused meanwhile
        Job.worker == worker,
        Job.worker_losses == job.worker_losses,
    )
    if counts and losses >= MAX_WORKER_LOSSES:
        fail(
            session,
            job,
            "worker_lost",
            f"the job's worker was lost, stopped or restarted {losses} times while running it",
            event=f"{reason}; the job failed after {losses} lost workers",
            fence=fence,
            at=at,
            worker_losses=losses,
        )
        return False
    tally = f"{losses} of {MAX_WORKER_LOSSES} losses allowed" if counts else "not a loss"
    return transition(
        session,
        job,
        JobStatus.QUEUED,
        f"{reason}; the job is back in line ({tally})",
        level="warn",
        fence=fence,
        worker_losses=losses,
        **UNDISPATCHED,
        **OFF_WORKER,
    )


# --- on hold ------------------------------------------------------------------------------


def pause(session: Session, job: Job) -> bool:
    """queued or running -> paused. A running job's worker sees it within a few steps,
    checkpoints and stops; the job keeps its worker until then (resume waits for it)."""
    return transition(
        session,
        job,
        JobStatus.PAUSED,
        "Fine-tuning job paused",
        fence=(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),),
        **UNDISPATCHED,
        dispatch_token=Job.dispatch_token + 1,  # a task still in the broker cannot claim it
        estimated_finish=None,
        preempted_at=None,  # paused by its team: it waits for its team, not the scheduler
        earmarked_worker=None,  # GPUs a preemption is freeing for it go to the next job
    )


def keep_paused(session: Session, job: Job) -> bool:
    """A job the scheduler preempted (paused, to resume automatically) stays paused until
    its team resumes it: its team paused it too."""
    result = session.execute(
        update(Job)
        .where(Job.pk == job.pk, Job.status == JobStatus.PAUSED.value)
        .values(preempted_at=None)
    )
    session.expire(job)
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job.pk, "Fine-tuning job paused by its team; it resumes when asked")
    return True


def preempt(session: Session, job: Job, message: str, *, at: float) -> bool:
    """running -> paused by the scheduler, for another team's job (app.services.preemption):
    the run checkpoints at its next step and stops like a pause; once its GPUs are free
    the scheduler resumes it (it keeps its place in line by age)."""
    return transition(
        session,
        job,
        JobStatus.PAUSED,
        message,
        level="warn",
        fence=(Job.status == JobStatus.RUNNING.value, Job.preemptions == job.preemptions),
        **UNDISPATCHED,
        dispatch_token=Job.dispatch_token + 1,
        estimated_finish=None,
        preemptions=job.preemptions + 1,
        preempted_at=int(at),
    )


def resume(session: Session, job: Job, message: str = "Fine-tuning job resumed") -> bool:
    """paused -> queued: back in line, to continue from its last checkpoint."""
    return transition(
        session,
        job,
        JobStatus.QUEUED,
        f"{message}; back in line",
        fence=(Job.status == JobStatus.PAUSED.value, Job.devices.is_(None)),
        worker=None,
    )


# --- ends ---------------------------------------------------------------------------------


def succeed(
    session: Session,
    job: Job,
    *,
    model_name: str,
    trained_tokens: int,
    result_files: list[str],
    fence: tuple = (),
) -> bool:
    """running -> succeeded, with the fine-tuned model's name and its result files."""
    return transition(
        session,
        job,
        JobStatus.SUCCEEDED,
        f"The job has successfully completed: {model_name}",
        fence=fence,
        fine_tuned_model=model_name,
        trained_tokens=trained_tokens,
        result_files=result_files,
        finished_at=now(),
        estimated_finish=None,
    )


def finish_export(
    session: Session, job: Job, *, result_files: list[str], message: str, fence: tuple = ()
) -> bool:
    """running -> succeeded for an export: its files; it names no model of its own."""
    return transition(
        session,
        job,
        JobStatus.SUCCEEDED,
        message,
        fence=fence,
        result_files=result_files,
        finished_at=now(),
        estimated_finish=None,
    )


def fail(
    session: Session,
    job: Job,
    code: str,
    message: str,
    *,
    param: str | None = None,
    event: str | None = None,
    fence: tuple = (),
    at: float | None = None,
    **fields: object,
) -> bool:
    """-> failed, with an OpenAI-style error (`code`, `param`, `message`). The event says
    `event`, by default "Training failed: <message>"."""
    return transition(
        session,
        job,
        JobStatus.FAILED,
        event if event is not None else f"Training failed: {message}",
        level="error",
        fence=fence,
        error={"code": code, "param": param, "message": message},
        finished_at=int(at if at is not None else now()),
        estimated_finish=None,
        **fields,
    )


def cancel(session: Session, job: Job, *, actor: Literal["team", "admin"]) -> bool:
    """-> cancelled, by the job's team or by an administrator (the event says which). A
    running job's worker sees it within a few steps and stops, saving nothing."""
    by = " by an administrator" if actor == "admin" else ""
    return transition(
        session,
        job,
        JobStatus.CANCELLED,
        f"Fine-tuning job cancelled{by}",
        finished_at=now(),
        earmarked_worker=None,
    )


def release(
    session: Session,
    job_id: str,
    *,
    worker: str,
    attempt: int,
    seconds: float,
    half_life_hours: float,
) -> None:
    """The end of a run, whatever its outcome: meter its GPU time (on the job and, for
    fair share, on its team: N GPUs for T seconds are N*T; the GPUs were used even when
    the job has since moved on) and free its GPUs, those of this run (`worker`,
    `attempt`) only: a run that ends late, after its job was put back in line and claimed
    again on the same host, must not free the new run's GPUs."""
    gpus = session.scalar(select(Job.gpus).where(Job.id == job_id)) or 1
    record_gpu_seconds(session, job_id, seconds * gpus, half_life_hours)
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker == worker, Job.attempt == attempt)
        .values(devices=None)
    )
    session.execute(
        update(Worker)
        .where(Worker.id == worker)
        .values(
            jobs_done=Worker.jobs_done + 1,
            current_job=case((Worker.current_job == job_id, None), else_=Worker.current_job),
        )
    )


def _show_on_worker(session: Session, worker: str, job_id: str) -> None:
    """Show the job on the worker's registry row (the latest of the host's jobs)."""
    session.execute(update(Worker).where(Worker.id == worker).values(current_job=job_id))
