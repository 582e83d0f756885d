"""One fine-tuning job, start to end: claim it, fetch its data, train, publish the adapter.

Reads top to bottom. The database is the truth: the claim is a guarded transition
(queued -> running), so a second delivery of the same task is a no-op, and a cancel
written by the API is seen by the training loop through `should_stop`.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import socket
import tarfile
import tempfile
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import TINY_RANDOM_LLAMA, Settings, get_settings
from app.db import make_engine, make_sessionmaker
from app.domain.ids import new_id
from app.domain.jobs import JobStatus
from app.models import Checkpoint, File, Job, now
from app.services.events import add_event
from app.services.jobs import transition
from app.storage import ObjectStore, open_store
from worker.training.spec import LoraSpec, QuantSpec, TrainingHooks, TrainingResult, TrainingSpec

log = logging.getLogger(__name__)
METRICS_COLUMNS = ["step", "train_loss", "valid_loss", "learning_rate", "epoch"]


def run_job(job_id: str, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    try:
        with sessions() as session:
            job = session.scalar(select(Job).where(Job.id == job_id))
            if job is None:
                return "missing"
            claimed = transition(
                session,
                job,
                JobStatus.RUNNING,
                "Fine-tuning job started",
                worker=socket.gethostname(),
                attempt=job.attempt + 1,
                started_at=now(),
            )
            if not claimed:  # cancelled meanwhile, or a duplicate delivery
                session.rollback()
                return f"skipped ({job.status})"
            session.commit()
        try:
            return _train_and_publish(job_id, settings, sessions, store)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            with sessions() as session:
                job = session.scalar(select(Job).where(Job.id == job_id))
                error = {
                    "code": "training_failed",
                    "param": None,
                    "message": f"{type(exc).__name__}: {exc}"[:1000],
                }
                transition(
                    session,
                    job,
                    JobStatus.FAILED,
                    f"Training failed: {error['message']}",
                    level="error",
                    error=error,
                    finished_at=now(),
                    estimated_finish=None,
                )
                session.commit()
            return "failed"
    finally:
        engine.dispose()


def _train_and_publish(
    job_id: str, settings: Settings, sessions: sessionmaker[Session], store: ObjectStore
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
    with tempfile.TemporaryDirectory(prefix=f"lathe-{job_id}-") as tmp:
        workdir = Path(tmp)
        train_path = workdir / "train.jsonl"
        store.get_file(files[job.training_file].storage_key, train_path)
        valid_path = None
        if job.validation_file:
            valid_path = workdir / "valid.jsonl"
            store.get_file(files[job.validation_file].storage_key, valid_path)
        spec = _training_spec(job, settings, train_path, valid_path, workdir / "run")
        model_name = f"ft:{job.model}:{team_name}:{job.suffix or ''}:{job.id.split('-')[1][:8]}"
        hooks = _hooks(job, settings, sessions, store, model_name)
        result = run_training(spec, hooks)
        if result.stopped:
            return "cancelled"
        return _publish(job, sessions, store, result, workdir, model_name)


def _training_spec(
    job: Job, settings: Settings, train: Path, valid: Path | None, output: Path
) -> TrainingSpec:
    base = settings.base_model(job.model)
    if base is None:
        raise ValueError(f"base model {job.model!r} is no longer configured")
    base_path = settings.base_model_path(base)
    if base.name == TINY_RANDOM_LLAMA and not base.path:
        from worker.training.tiny_model import ensure_tiny_random_llama

        ensure_tiny_random_llama(base_path, base.chat_template or "")
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
        device=settings.device,
    )


def _hooks(
    job: Job,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    model_name: str,
) -> TrainingHooks:
    started = time.monotonic()
    last_poll = [0.0]
    stop = [False]

    def on_metrics(row: dict) -> None:
        step, total = row["step"], row.get("total_steps") or row["step"]
        parts = [f"Step {step}/{total}"]
        if row.get("train_loss") is not None:
            parts[0] += f": training loss={row['train_loss']:.4f}"
        if row.get("valid_loss") is not None:
            parts.append(f"validation loss={row['valid_loss']:.4f}")
        rate = (time.monotonic() - started) / max(step, 1)
        with sessions() as session:
            add_event(session, job.pk, ", ".join(parts), type="metrics", data=row)
            session.execute(
                Job.__table__.update()
                .where(Job.pk == job.pk, Job.status == "running")
                .values(estimated_finish=now() + int(rate * max(total - step, 0)))
            )
            session.commit()

    def should_stop() -> bool:
        if stop[0]:
            return True
        if time.monotonic() - last_poll[0] >= settings.cancel_poll_seconds:
            last_poll[0] = time.monotonic()
            with sessions() as session:
                status = session.scalar(select(Job.status).where(Job.pk == job.pk))
            stop[0] = status != JobStatus.RUNNING
        return stop[0]

    def on_checkpoint(step: int, adapter_dir: Path, metrics: dict) -> None:
        key = f"jobs/{job.id}/checkpoints/step-{step}.tar.gz"
        archive = adapter_dir.parent / f"checkpoint-{step}.tar.gz"
        _tar_adapter(adapter_dir, archive)
        store.put_file(key, archive)
        with sessions() as session:
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_pk=job.pk,
                    step_number=step,
                    storage_key=key,
                    fine_tuned_model_checkpoint=f"{model_name}:ckpt-step-{step}",
                    metrics={k: metrics.get(k) for k in ("step", "train_loss", "valid_loss")},
                )
            )
            add_event(session, job.pk, f"Checkpoint saved at step {step}")
            session.commit()

    def on_message(message: str) -> None:
        with sessions() as session:
            add_event(session, job.pk, message)
            session.commit()

    return TrainingHooks(on_metrics, should_stop, on_checkpoint, on_message)


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


def _publish(
    job: Job,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    result: TrainingResult,
    workdir: Path,
    model_name: str,
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
        done = transition(
            session,
            session.get_one(Job, job.pk),
            JobStatus.SUCCEEDED,
            f"The job has successfully completed: {model_name}",
            fine_tuned_model=model_name,
            trained_tokens=result.trained_tokens,
            result_files=[r.id for r in records],
            finished_at=now(),
            estimated_finish=None,
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
        storage_key=f"files/{file_id}",
        status="processed",
    )
