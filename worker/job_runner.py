"""One fine-tuning job, start to end: claim it, fetch its data, train, publish the adapter.

Reads top to bottom. The database is the truth: the claim is a guarded transition
(queued -> running) fenced by the dispatch token the scheduler put in the task, so a
second or stale delivery of a task is a no-op, and a cancel or pause written by the API
is seen by the training loop through `should_stop`. The worker's registry row shows the
job while it runs; the job's GPU seconds are metered from claim to end.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.config import Settings, get_settings
from app.db import RETRYABLE, make_engine, make_sessionmaker, retry_db
from app.domain.ids import new_id
from app.domain.jobs import JobStatus
from app.lifetime import child_env
from app.logs import bind, log_context
from app.models import Checkpoint, File, Job, JobEvent, now
from app.services import lifecycle
from app.services.events import add_event
from app.storage import ObjectStore, checkpoint_key, file_key, open_store
from worker.model_cache import BaseModelUnavailable, resolve_base_model
from worker.training.spec import (
    Levers,
    LoraSpec,
    QuantSpec,
    TrainingDataError,
    TrainingHooks,
    TrainingResult,
    TrainingSpec,
)

log = logging.getLogger(__name__)
METRICS_COLUMNS = [
    "step",
    "train_loss",
    "valid_loss",
    "valid_mean_token_accuracy",
    "valid_accuracy",
    "learning_rate",
    "epoch",
]
# What a checkpoint's metrics hold (OpenAI's names where it has them).
CHECKPOINT_METRICS = (
    "step",
    "train_loss",
    "valid_loss",
    "valid_mean_token_accuracy",
    "valid_accuracy",
)


def worker_id() -> str:
    """The registry id of the worker this process serves (set by the worker's parent)."""
    return os.environ.get("LATHE_WORKER_ID") or socket.gethostname()


def run_job(
    job_id: str,
    settings: Settings | None = None,
    token: int | None = None,
    isolate: bool = False,
) -> str:
    """Run one job; `token` is the dispatch token the task carries (None: any).

    With `isolate` (the Celery task), training runs in a fresh Python process
    (worker.job_process): torch and CUDA memory go away with it, the Celery pool process
    stays warm for the next job, and a training process that dies (OOM kill, segfault)
    fails the job with its exit status instead of leaving it running.
    """
    # Every log line of the run carries the job, its team and the worker (app/logs.py).
    with log_context(job_id=job_id, worker=worker_id()):
        return _run_job(job_id, settings or get_settings(), token, isolate)


def _run_job(job_id: str, settings: Settings, token: int | None, isolate: bool) -> str:
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    me = worker_id()
    try:
        with sessions() as session:
            job = session.scalar(select(Job).where(Job.id == job_id))
            if job is None:
                return "missing"
            bind(team_id=job.team.id)
            attempt = job.attempt + 1
            if not lifecycle.claim(session, job, worker=me, token=token):
                session.rollback()  # cancelled or paused meanwhile, or a stale delivery
                return f"skipped ({job.status})"
            session.commit()
        started = time.monotonic()
        try:
            if isolate:
                return _train_in_subprocess(job_id, sessions, me, attempt, settings)
            return train_or_fail(job_id, settings, sessions, attempt)
        finally:
            release(sessions, job_id, me, time.monotonic() - started, settings)
    finally:
        engine.dispose()


@retry_db
def release(
    sessions: sessionmaker[Session], job_id: str, me: str, seconds: float, settings: Settings
) -> None:
    """Meter the run's GPU time and free the worker's slot (whatever the outcome)."""
    with sessions() as session:
        lifecycle.release(
            session,
            job_id,
            worker=me,
            seconds=seconds,
            half_life_hours=settings.fair_share_half_life_hours,
        )
        session.commit()


def lease(worker: str, attempt: int) -> tuple:
    """Conditions every write about a claimed job carries: it is still running, on this
    worker, in this attempt. A run that lost its job (its worker was declared lost and the
    job re-claimed elsewhere) can no longer fail, publish or annotate it."""
    return (
        Job.status == JobStatus.RUNNING.value,
        Job.worker == worker,
        Job.attempt == attempt,
    )


def train_or_fail(
    job_id: str, settings: Settings, sessions: sessionmaker[Session], attempt: int | None = None
) -> str:
    """Train and publish a claimed job; any error fails it with the cause."""
    with sessions() as session:
        worker, current = session.execute(
            select(Job.worker, Job.attempt).where(Job.id == job_id)
        ).one()
    if attempt is not None and attempt != current:
        return "stale"  # re-claimed by another attempt before this process started
    fence = lease(worker, current)
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    try:
        return _train_and_publish(job_id, settings, sessions, store, fence)
    except TrainingDataError as exc:  # the data, not the worker: say what to change
        _fail(sessions, job_id, exc.code, str(exc), fence)
        return "failed"
    except BaseModelUnavailable as exc:
        _fail(sessions, job_id, "base_model_unavailable", str(exc), fence)
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _fail(sessions, job_id, "training_failed", f"{type(exc).__name__}: {exc}", fence)
        return "failed"


@retry_db
def _fail(
    sessions: sessionmaker[Session], job_id: str, code: str, message: str, fence: tuple
) -> None:
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        lifecycle.fail(session, job, code, message[:1000], guard=fence)
        session.commit()


def _train_in_subprocess(
    job_id: str, sessions: sessionmaker[Session], me: str, attempt: int, settings: Settings
) -> str:
    """Train in `python -m worker.job_process`; if the job is cancelled or paused and the
    process has not stopped on its own within the grace period (it polls every step), it
    is killed so the GPU is freed whatever state training is in."""
    fence = lease(me, attempt)
    proc = subprocess.Popen(  # it dies with this process (app/lifetime.py)
        [sys.executable, "-m", "worker.job_process", job_id, str(attempt)], env=child_env()
    )
    stopping_since: float | None = None
    while proc.poll() is None:
        try:
            proc.wait(timeout=settings.heartbeat_seconds)
            break
        except subprocess.TimeoutExpired:
            pass
        with sessions() as session:
            held = session.scalar(select(Job.pk).where(Job.id == job_id, *fence))
        if held is None and stopping_since is None:
            stopping_since = time.monotonic()
        if stopping_since and time.monotonic() - stopping_since > settings.stop_grace_seconds:
            log.warning("job %s: training did not stop; killing it", job_id)
            proc.kill()
            proc.wait()
    with sessions() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    if proc.returncode != 0 and status == JobStatus.RUNNING:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        _fail(sessions, job_id, "training_process_died", f"the training process {how}", fence)
        return "failed"
    return status or "missing"


def _train_and_publish(
    job_id: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    fence: tuple,
) -> str:
    from worker.training.run import run_training  # torch is imported from here on

    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        files = {
            f.id: f
            for f in session.scalars(
                select(File).where(File.id.in_([job.training_file, job.validation_file or ""]))
            )
        }
        team_name = job.team.name
        # An earlier attempt's last checkpoint (a pause, later a crash): continue from it.
        latest = session.execute(
            select(Checkpoint.step_number, Checkpoint.storage_key)
            .where(Checkpoint.job_pk == job.pk)
            .order_by(Checkpoint.step_number.desc(), Checkpoint.pk.desc())
            .limit(1)
        ).first()
    with tempfile.TemporaryDirectory(prefix=f"lathe-{job_id}-") as tmp:
        workdir = Path(tmp)
        train_path = workdir / "train.jsonl"
        store.get_file(files[job.training_file].storage_key, train_path)
        valid_path = None
        if job.validation_file:
            valid_path = workdir / "valid.jsonl"
            store.get_file(files[job.validation_file].storage_key, valid_path)
        spec = _training_spec(job, settings, train_path, valid_path, workdir / "run")
        resumed_at = 0
        if latest is not None:
            checkpoint_dir = _fetch_checkpoint(store, latest.storage_key, workdir / "resume")
            if (checkpoint_dir / "trainer_state.json").is_file():
                resumed_at = latest.step_number
                spec = dataclasses.replace(spec, resume_from=checkpoint_dir)
                message = f"Resuming from checkpoint at step {resumed_at}"
            else:  # an adapter-only checkpoint, from before checkpoints were resumable
                message = f"Checkpoint at step {latest.step_number} is not resumable; starting over"
            with sessions() as session:
                add_event(session, job.pk, message)
                session.commit()
        model_name = f"ft:{job.model}:{team_name}:{job.suffix or ''}:{job.id.split('-')[1][:8]}"
        hooks = _hooks(job, settings, sessions, store, model_name, fence)
        result = run_training(spec, hooks)
        if result.stopped:  # cancelled or paused: nothing is published
            with sessions() as session:
                status = session.scalar(select(Job.status).where(Job.id == job_id))
                if status == JobStatus.PAUSED:
                    add_event(session, job.pk, f"Paused at step {result.step}; checkpoint kept")
                    session.commit()
                return status or "missing"
        if resumed_at:  # the metrics file covers the whole run, not only this attempt
            earlier = _metrics_up_to(sessions, job.pk, resumed_at)
            result = dataclasses.replace(result, metrics=earlier + result.metrics)
        return _publish(job, sessions, store, result, workdir, model_name, fence)


def _fetch_checkpoint(store: ObjectStore, key: str, target: Path) -> Path:
    """Download and unpack a checkpoint tarball (flat: a Trainer checkpoint directory)."""
    target.mkdir(parents=True)
    archive = target.parent / f"{target.name}.tar.gz"
    store.get_file(key, archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")  # no absolute paths, links out or devices
    archive.unlink()
    return target


def _metrics_up_to(sessions: sessionmaker[Session], job_pk: int, step: int) -> list[dict]:
    """The job's metrics rows up to `step`, from earlier attempts' events (the latest row
    of each step wins, should an attempt have run past its last checkpoint)."""
    with sessions() as session:
        rows = session.scalars(
            select(JobEvent.data)
            .where(JobEvent.job_pk == job_pk, JobEvent.type == "metrics")
            .order_by(JobEvent.pk)
        )
        by_step = {row["step"]: row for row in rows if row and row["step"] <= step}
    return [by_step[s] for s in sorted(by_step)]


def _training_spec(
    job: Job, settings: Settings, train: Path, valid: Path | None, output: Path
) -> TrainingSpec:
    base = settings.base_model(job.model)
    if base is None:
        raise ValueError(f"base model {job.model!r} is no longer configured")
    base_path = resolve_base_model(base, settings)
    hp = job.hyperparameters
    return TrainingSpec(
        base_model_path=base_path,
        chat_template=base.chat_template,
        data_format=job.data_format or "chat",
        train_file=train,
        valid_file=valid,
        output_dir=output,
        n_epochs=hp["n_epochs"],
        batch_size=hp["batch_size"],
        learning_rate=base.learning_rate * hp["learning_rate_multiplier"],
        max_seq_length=job.max_seq_length,
        seed=job.seed,
        lora=LoraSpec(
            r=job.lora["r"],
            alpha=job.lora["alpha"],
            dropout=job.lora["dropout"],
            target_modules=tuple(job.lora["target_modules"]),
        ),
        quant=QuantSpec(**job.quantization),
        levers=_levers(job.training or {}),
        device=settings.device,
        checkpoint_steps=settings.checkpoint_every_steps,
        checkpoint_seconds=settings.checkpoint_every_seconds,
    )


def _levers(training: dict) -> Levers:
    """The job's TrainingIn (stored as JSON) as the trainer's Levers; absent keys default."""
    known = {f.name for f in dataclasses.fields(Levers)}
    values = {k: v for k, v in training.items() if k in known}
    if values.get("gradient_checkpointing") == "auto":
        values["gradient_checkpointing"] = None
    return Levers(**values)


def _hooks(
    job: Job,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    model_name: str,
    fence: tuple,
) -> TrainingHooks:
    started = time.monotonic()
    first_step: list[int] = []  # this attempt's first step (a resumed run starts past 1)
    last_poll = [0.0]
    stop: list[str | None] = [None]

    def on_metrics(row: dict) -> None:
        step, total = row["step"], row.get("total_steps") or row["step"]
        parts = [f"Step {step}/{total}"]
        if row.get("train_loss") is not None:
            parts[0] += f": training loss={row['train_loss']:.4f}"
        if row.get("valid_loss") is not None:
            parts.append(f"validation loss={row['valid_loss']:.4f}")
        if not first_step:
            first_step.append(step)
        rate = (time.monotonic() - started) / max(step - first_step[0] + 1, 1)
        with sessions() as session:
            add_event(session, job.pk, ", ".join(parts), type="metrics", data=row)
            session.execute(
                Job.__table__.update()
                .where(Job.pk == job.pk, *fence)
                .values(estimated_finish=now() + int(rate * max(total - step, 0)))
            )
            session.commit()

    def should_stop() -> str | None:
        """Why training should stop: "pause" once the job is paused (it checkpoints, then
        stops), "cancel" once it is anything else but running (it stops, saving nothing),
        or running again under a later attempt (paused and resumed before this one saw it)."""
        if stop[0] is None and time.monotonic() - last_poll[0] >= settings.cancel_poll_seconds:
            last_poll[0] = time.monotonic()
            with sessions() as session:
                status, attempt = session.execute(
                    select(Job.status, Job.attempt).where(Job.pk == job.pk)
                ).one()
            if attempt != job.attempt:
                stop[0] = "cancel"  # not this attempt's job any more: save nothing
            elif status == JobStatus.PAUSED:
                stop[0] = "pause"
            elif status != JobStatus.RUNNING:
                stop[0] = "cancel"
        return stop[0]

    def on_checkpoint(step: int, checkpoint_dir: Path, metrics: dict) -> None:
        # The whole Trainer checkpoint, flat: the adapter at the root (PeftModel loads the
        # tarball as is) plus what resuming needs: optimizer, scheduler, RNG, trainer state.
        key = checkpoint_key(job.team.id, job.id, step)
        archive = checkpoint_dir.parent / f"{checkpoint_dir.name}.tar.gz"
        _tar_adapter(checkpoint_dir, archive)
        store.put_file(key, archive)
        archive.unlink()
        with sessions() as session:
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_pk=job.pk,
                    step_number=step,
                    storage_key=key,
                    fine_tuned_model_checkpoint=f"{model_name}:ckpt-step-{step}",
                    metrics={k: metrics[k] for k in CHECKPOINT_METRICS if k in metrics},
                )
            )
            add_event(session, job.pk, f"Checkpoint saved at step {step}")
            session.commit()

    def on_message(message: str) -> None:
        with sessions() as session:
            add_event(session, job.pk, message)
            session.commit()

    reported: dict[str, dict] = {}

    def on_report(kind: str, message: str, data: dict) -> None:
        # Shown on the job (its `stats`, merged by kind) and as an event with the figures.
        reported[kind] = data
        with sessions() as session:
            add_event(session, job.pk, message, data={"kind": kind, **data})
            stats = session.scalar(select(Job.stats).where(Job.pk == job.pk)) or {}
            session.execute(
                update(Job).where(Job.pk == job.pk, *fence).values(stats={**stats, **reported})
            )
            session.commit()

    def keep_going_if_unreachable() -> str | None:
        try:
            return should_stop()
        except RETRYABLE:  # cannot read the job now: train on, look again next step
            log.warning("job %s: could not poll its state", job.id)
            return stop[0]

    # Writes wait out a database restart rather than failing the job.
    return TrainingHooks(
        retry_db(on_metrics),
        keep_going_if_unreachable,
        retry_db(on_checkpoint),
        retry_db(on_message),
        retry_db(on_report),
    )


def _tar_adapter(adapter_dir: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(adapter_dir.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)


def _write_metrics_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRICS_COLUMNS})


@retry_db
def _publish(
    job: Job,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    result: TrainingResult,
    workdir: Path,
    model_name: str,
    fence: tuple,
) -> str:
    adapter = workdir / "adapter.tar.gz"
    metrics = workdir / "metrics.csv"
    _tar_adapter(result.adapter_dir, adapter)
    _write_metrics_csv(result.metrics, metrics)
    records = []
    for path in (adapter, metrics):
        record = _result_file(job, path)
        store.put_file(record.storage_key, path)
        records.append(record)
    with sessions() as session:
        session.add_all(records)
        done = lifecycle.succeed(
            session,
            session.get_one(Job, job.pk),
            model_name=model_name,
            trained_tokens=result.trained_tokens,
            result_files=[r.id for r in records],
            guard=fence,
        )
        if not done:  # cancelled while the results were uploading: publish nothing
            session.rollback()
            for record in records:
                store.delete(record.storage_key)
            return "cancelled"
        session.commit()
    return "succeeded"


def _result_file(job: Job, path: Path) -> File:
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
    file_id = new_id("file")
    return File(
        id=file_id,
        team_pk=job.team_pk,
        filename=path.name,
        purpose="fine-tune-results",
        bytes=path.stat().st_size,
        sha256=digest.hexdigest(),
        storage_key=file_key(job.team.id, file_id),
        status="processed",
    )
