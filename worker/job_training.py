"""A claimed job's training, in its own process (worker.job_process): fetch its data,
resume from its last checkpoint, train (worker.training.run), publish the adapter.

Any error fails the job with its cause. Every write carries the run's fence (the worker
and attempt that claimed it), so a run that lost its job can no longer touch it.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.config import Settings
from app.db import retry_db
from app.domain.hyperparameters import DEFAULT_BETA
from app.domain.jobs import JobKind, JobStatus
from app.models import Checkpoint, File, Job
from app.services import lifecycle
from app.services.events import add_event
from app.services.training_metrics import metrics_rows_up_to
from app.storage import ObjectStore, open_store
from worker.job_hooks import JobHooks
from worker.model_cache import BaseModelUnavailable, resolve_base_model
from worker.publish import publish
from worker.run_outcome import MISSING, STALE
from worker.tracking import Tracking
from worker.training.spec import (
    DDP,
    SUPERVISED,
    LoraSpec,
    QuantSpec,
    TrainingDataError,
    TrainingOptions,
    TrainingResult,
    TrainingSpec,
)

log = logging.getLogger(__name__)


def train_or_fail(
    job_id: str, settings: Settings, sessions: sessionmaker[Session], attempt: int | None = None
) -> str:
    """Train and publish a claimed job, or write out a claimed export
    (worker.job_export); any error fails it with the cause."""
    with sessions() as session:
        worker, current, kind = session.execute(
            select(Job.worker, Job.attempt, Job.kind).where(Job.id == job_id)
        ).one()
    if attempt is not None and attempt != current:
        return STALE  # re-claimed by another attempt before this process started
    fence = lifecycle.run_fence(worker, current)
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    if kind == JobKind.EXPORT:
        return _export_or_fail(job_id, settings, sessions, store, fence)
    try:
        return _train_and_publish(job_id, settings, sessions, store, fence, (worker, current))
    except TrainingDataError as exc:  # the data, not the worker: say what to change
        fail_run(sessions, job_id, exc.code, str(exc), fence)
        return JobStatus.FAILED
    except BaseModelUnavailable as exc:
        fail_run(sessions, job_id, "base_model_unavailable", str(exc), fence)
        return JobStatus.FAILED
    except ParentModelUnavailable as exc:
        fail_run(sessions, job_id, "parent_model_unavailable", str(exc), fence)
        return JobStatus.FAILED
    except Exception as exc:
        log.exception("job %s failed", job_id)
        fail_run(sessions, job_id, "training_failed", f"{type(exc).__name__}: {exc}", fence)
        return JobStatus.FAILED


def _export_or_fail(
    job_id: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    fence: tuple,
) -> str:
    from worker.export.adapter_weights import AdapterMergeError
    from worker.export.gguf import GgufUnsupported
    from worker.job_export import export_and_publish

    try:
        return export_and_publish(job_id, settings, sessions, store, fence)
    except GgufUnsupported as exc:  # the model, not the worker: say so
        code, message = "unsupported_export_for_model", str(exc)
    except AdapterMergeError as exc:
        code, message = "adapter_mismatch", str(exc)
    except BaseModelUnavailable as exc:
        code, message = "base_model_unavailable", str(exc)
    except ParentModelUnavailable as exc:
        code, message = "adapter_unavailable", str(exc)
    except Exception as exc:
        log.exception("export %s failed", job_id)
        code, message = "export_failed", f"{type(exc).__name__}: {exc}"
    fail_run(sessions, job_id, code, message, fence, what="Export")
    return JobStatus.FAILED


@retry_db
def fail_run(
    sessions: sessionmaker[Session],
    job_id: str,
    code: str,
    message: str,
    fence: tuple,
    what: str = "Training",
) -> None:
    """Fail the run's job with `code` and `message`, unless it no longer holds the job."""
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        lifecycle.fail(
            session, job, code, message[:1000], fence=fence, event=f"{what} failed: {message}"
        )
        session.commit()


def _train_and_publish(
    job_id: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    fence: tuple,
    claimed: tuple[str, int],
) -> str:
    """`claimed`: the (worker, attempt) the fence is made of, which a run on several
    devices hands to its rank 0 (worker.job_rank)."""

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
        parent = getattr(job, "parent", None)
        if parent:
            # Training on from a fine-tuned model: its adapter (a job's adapter.tar.gz or a
            # checkpoint's tarball, both flat) is where training starts, and a DPO job's
            # reference. A resumed run needs it too: its checkpoint holds the trained
            # adapter, not the reference.
            parent_dir = _fetch_parent(store, parent, workdir / "parent")
            spec = dataclasses.replace(spec, parent_adapter=parent_dir)
        resumed_at = 0
        if latest is not None:
            checkpoint_dir = _fetch_archive(store, latest.storage_key, workdir / "resume")
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
        hooks = JobHooks(job, settings, sessions, store, model_name, fence)
        # The job's integrations (MLflow, W&B): no call of Tracking raises, so a tracking
        # server that is down costs a warning event, never the job.
        tracking = Tracking.for_job(job, settings, workdir)
        try:
            if spec.world_size > 1:
                try:
                    result = _train_on_devices(spec, workdir, job, claimed, model_name, settings)
                finally:
                    # Rank 0 ran the job's tracking runs; they go on here (the trackers
                    # find them by the job's id) for the adapter and the outcome.
                    tracking.start()
            else:
                from worker.training.run import run_training  # torch is imported from here

                hooks.start_tracking(tracking)
                result = run_training(spec, hooks.training_hooks())
            if result.stopped:  # cancelled or paused: nothing is published
                with sessions() as session:
                    status = session.scalar(select(Job.status).where(Job.id == job_id))
                    if status == JobStatus.PAUSED:
                        add_event(session, job.pk, f"Paused at step {result.step}; checkpoint kept")
                        session.commit()
                # A paused run stays open for the attempt that resumes it.
                tracking.finish("paused" if status == JobStatus.PAUSED else "cancelled")
                return status or MISSING
            if resumed_at:  # the metrics file covers the whole run, not only this attempt
                with sessions() as session:
                    earlier = metrics_rows_up_to(session, job.pk, resumed_at)
                result = dataclasses.replace(result, metrics=earlier + result.metrics)
            outcome = publish(job, sessions, store, result, workdir, model_name, fence)
            if outcome == JobStatus.SUCCEEDED:
                tracking.log_artifact(workdir / "adapter.tar.gz")  # publish wrote it there
            tracking.finish(outcome)
            return outcome
        except BaseException:
            tracking.finish("failed")
            raise


def _train_on_devices(
    spec: TrainingSpec,
    workdir: Path,
    job: Job,
    claimed: tuple[str, int],
    model_name: str,
    settings: Settings,
) -> TrainingResult:
    """Train on job.gpus devices, one rank each (worker.job_rank): rank 0 reports to the
    job and writes checkpoints as this process would; its result comes back here."""
    from worker.job_rank import train_on_ranks

    return train_on_ranks(
        spec, workdir, job_id=job.id, claimed=claimed, model_name=model_name, settings=settings
    )


class ParentModelUnavailable(Exception):
    """The adapter a job trains on from is gone from storage or holds no adapter."""


def _fetch_parent(store: ObjectStore, parent: dict, target: Path) -> Path:
    """The parent's adapter, unpacked; ParentModelUnavailable names the model and its job,
    never the object-store key (the team does not see where storage keeps things)."""
    where = f"{parent.get('fine_tuned_model')} (job {parent.get('job')})"
    try:
        parent_dir = _fetch_archive(store, parent["storage_key"], target)
    except Exception as exc:
        log.warning("parent archive %s unavailable: %s", parent.get("storage_key"), exc)
        raise ParentModelUnavailable(
            f"the adapter of {where} is no longer in storage; train from the base model, or "
            "ask an operator to restore it"
        ) from exc
    if not (parent_dir / "adapter_config.json").is_file():
        raise ParentModelUnavailable(
            f"the {parent.get('archive', 'adapter')} of {where} holds no adapter"
        )
    return parent_dir


def _fetch_archive(store: ObjectStore, key: str, target: Path) -> Path:
    """Download and unpack a flat tarball: a checkpoint (a Trainer checkpoint directory,
    the adapter at its root) or an adapter (adapter_config.json + adapter_model.safetensors)."""
    target.mkdir(parents=True)
    archive = target.parent / f"{target.name}.tar.gz"
    store.get_file(key, archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")  # no absolute paths, links out or devices
    archive.unlink()
    return target


def _training_spec(
    job: Job, settings: Settings, train: Path, valid: Path | None, output: Path
) -> TrainingSpec:
    base = settings.base_model(job.model)
    if base is None:
        raise ValueError(f"base model {job.model!r} is no longer configured")
    base_path = resolve_base_model(base, settings)
    hp = job.hyperparameters
    method = getattr(job, "method", None) or SUPERVISED
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
        options=_training_options(job.training or {}),
        device=settings.device,
        checkpoint_steps=settings.checkpoint_every_steps,
        checkpoint_seconds=settings.checkpoint_every_seconds,
        method=method,
        beta=_beta(hp.get("beta")),
        world_size=getattr(job, "gpus", None) or 1,
        parallelism=getattr(job, "parallelism", None) or DDP,
    )


def _beta(value: object) -> float:
    """The job's DPO beta; absent (a supervised job) or OpenAI's "auto": the default."""
    return float(value) if isinstance(value, int | float) else DEFAULT_BETA


def _training_options(training: dict) -> TrainingOptions:
    """The job's TrainingIn (stored as JSON) as TrainingOptions; absent keys default."""
    known = {f.name for f in dataclasses.fields(TrainingOptions)}
    values = {k: v for k, v in training.items() if k in known}
    if values.get("gradient_checkpointing") == "auto":
        values["gradient_checkpointing"] = None
    return TrainingOptions(**values)
