"""The training loop's callbacks for one job, in the job process: they write its progress
to the database (events, estimated finish, stats, checkpoints) and tell the loop when the
job was paused or cancelled.

A class with its state on `self` (the attempt's start and first step, when the job's
state was last read, why it stops, the figures reported so far), in the shape of TRL's
callbacks; a test overrides one method in a subclass. worker.training knows nothing of
the database: it calls the plain TrainingHooks that `training_hooks()` builds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import RETRYABLE, retry_db
from app.domain.ids import new_id
from app.domain.jobs import JobStatus
from app.models import Checkpoint, File, Job, now
from app.services.events import add_event
from app.services.training_metrics import METRICS_EVENT
from app.storage import ObjectStore, checkpoint_key
from worker.publish import result_file, tar_directory, tar_files
from worker.training.spec import STEP_FIGURES, TrainingHooks

if TYPE_CHECKING:
    from worker.tracking import Tracking

log = logging.getLogger(__name__)

# What a checkpoint's metrics hold (OpenAI's names where it has them).
CHECKPOINT_METRICS = STEP_FIGURES  # what a checkpoint keeps of its step's row
# What of a checkpoint PeftModel.from_pretrained needs: the adapter's config and weights
# (a classifier's head among them), and which output is which class where the run says.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "classes.json")
ADAPTER_REQUIRED = {"adapter_config.json", "adapter_model.safetensors"}


class JobHooks:
    """One attempt's callbacks. Every write carries `fence` (app.services.lifecycle.run_fence):
    a run that lost its job can no longer annotate it."""

    def __init__(
        self,
        job: Job,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ObjectStore,
        model_name: str,
        fence: tuple,
    ) -> None:
        self.job = job
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.model_name = model_name
        self.fence = fence
        self.started = time.monotonic()
        self.first_step: int | None = None  # this attempt's (a resumed run starts past 1)
        self.last_poll = 0.0
        self.stop: str | None = None  # why training stops, once known
        self.reported: dict[str, dict] = {}  # the job's stats, by kind
        # The job's MLflow / W&B runs (start_tracking): metrics rows and reports go there too.
        self.tracking: Tracking | None = None

    def training_hooks(self) -> TrainingHooks:
        """What run_training calls. Writes wait out a database restart rather than failing
        the job; a poll that cannot reach it trains on."""
        return TrainingHooks(
            retry_db(self.on_metrics),
            self.keep_going_if_unreachable,
            retry_db(self.on_checkpoint),
            retry_db(self.on_message),
            retry_db(self.on_report),
        )

    def on_metrics(self, row: dict) -> None:
        step, total = row["step"], row.get("total_steps") or row["step"]
        parts = [f"Step {step}/{total}"]
        if row.get("train_loss") is not None:
            parts[0] += f": training loss={row['train_loss']:.4f}"
        if row.get("valid_loss") is not None:
            parts.append(f"validation loss={row['valid_loss']:.4f}")
        if self.first_step is None:
            self.first_step = step
        rate = (time.monotonic() - self.started) / max(step - self.first_step + 1, 1)
        with self.sessions() as session:
            add_event(session, self.job.pk, ", ".join(parts), type=METRICS_EVENT, data=row)
            session.execute(
                Job.__table__.update()
                .where(Job.pk == self.job.pk, *self.fence)
                .values(estimated_finish=now() + int(rate * max(total - step, 0)))
            )
            session.commit()
        if self.tracking is not None:  # after the commit: a retried write logs it once
            self.tracking.log_metrics(row)

    def should_stop(self) -> str | None:
        """Why training should stop: "pause" once the job is paused (it checkpoints, then
        stops), "cancel" once it is anything else but running (it stops, saving nothing),
        or running again under a later attempt (paused and resumed before this one saw it).
        Read at most every `cancel_poll_seconds`; once known, the answer stays."""
        if (
            self.stop is None
            and time.monotonic() - self.last_poll >= self.settings.cancel_poll_seconds
        ):
            self.last_poll = time.monotonic()
            with self.sessions() as session:
                status, attempt = session.execute(
                    select(Job.status, Job.attempt).where(Job.pk == self.job.pk)
                ).one()
            if attempt != self.job.attempt:
                self.stop = "cancel"  # not this attempt's job any more: save nothing
            elif status == JobStatus.PAUSED:
                self.stop = "pause"
            elif status != JobStatus.RUNNING:
                self.stop = "cancel"
        return self.stop

    def keep_going_if_unreachable(self) -> str | None:
        try:
            return self.should_stop()
        except RETRYABLE:  # cannot read the job now: train on, look again next step
            log.warning("job %s: could not poll its state", self.job.id)
            return self.stop

    def on_checkpoint(self, step: int, checkpoint_dir: Path, metrics: dict) -> None:
        # The whole Trainer checkpoint, flat: the adapter at the root (PeftModel loads the
        # tarball as is) plus what resuming needs: optimizer, scheduler, RNG, trainer state.
        key = checkpoint_key(self.job.team.id, self.job.id, step)
        archive = checkpoint_dir.parent / f"{checkpoint_dir.name}.tar.gz"
        tar_directory(checkpoint_dir, archive)
        self.store.put_file(key, archive)
        archive.unlink()
        adapter = self.upload_adapter(step, checkpoint_dir)
        with self.sessions() as session:
            # The file and the checkpoint that names it commit together. Like the checkpoint
            # itself, neither is fenced: a pause's checkpoint is written once the job is
            # already paused. An object whose row never commits (a crash; a retried write
            # uploads again under a new id) is swept as an orphan (files.sweep_orphans).
            if adapter is not None:
                session.add(adapter)
                session.flush()  # the row the checkpoint's foreign key names, first
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_pk=self.job.pk,
                    step_number=step,
                    storage_key=key,
                    fine_tuned_model_checkpoint=f"{self.model_name}:ckpt-step-{step}",
                    metrics={k: metrics[k] for k in CHECKPOINT_METRICS if k in metrics},
                    adapter_file=adapter.id if adapter is not None else None,
                )
            )
            add_event(session, self.job.pk, f"Checkpoint saved at step {step}")
            session.commit()

    def upload_adapter(self, step: int, checkpoint_dir: Path) -> File | None:
        """The checkpoint's adapter alone, uploaded as a file of the team's (its row, not yet
        added), so a team can keep an earlier step than the last, without what only
        resuming reads (the optimizer's state alone is twice the adapter's size with Adam).
        None, with a warning, when the checkpoint holds no adapter to load."""
        paths = [checkpoint_dir / name for name in ADAPTER_FILES]
        paths = [path for path in paths if path.is_file()]
        if not ADAPTER_REQUIRED <= {path.name for path in paths}:
            log.warning("job %s: checkpoint %d holds no adapter to upload", self.job.id, step)
            return None
        archive = checkpoint_dir.parent / f"checkpoint-step-{step}-adapter.tar.gz"
        try:
            tar_files(paths, archive)
            record = result_file(self.job, archive)
            self.store.put_file(record.storage_key, archive)
        finally:
            archive.unlink(missing_ok=True)
        return record

    def on_message(self, message: str) -> None:
        with self.sessions() as session:
            add_event(session, self.job.pk, message)
            session.commit()

    def on_report(self, kind: str, message: str, data: dict) -> None:
        # Shown on the job (its `stats`, merged by kind) and as an event with the figures.
        self.reported[kind] = data
        with self.sessions() as session:
            add_event(session, self.job.pk, message, data={"kind": kind, **data})
            stats = session.scalar(select(Job.stats).where(Job.pk == self.job.pk)) or {}
            session.execute(
                update(Job)
                .where(Job.pk == self.job.pk, *self.fence)
                .values(stats={**stats, **self.reported})
            )
            session.commit()
        if self.tracking is not None and kind != "tracking":
            self.tracking.log_report(kind, data)

    def start_tracking(self, tracking: Tracking) -> None:
        """Start the job's tracking runs and make them the job's: their warnings become
        warn events, metrics rows and reports go to them, and where they are (ids, URLs)
        lands in stats.tracking and an event. A tracker that cannot start is a warning."""
        self.tracking = tracking
        tracking.on_warning = retry_db(self.on_tracking_warning)
        runs = tracking.start()
        if runs:
            message = f"Tracking this run: {tracking.describe(runs)}"
            retry_db(self.on_report)("tracking", message, runs)

    def on_tracking_warning(self, message: str) -> None:
        with self.sessions() as session:
            add_event(session, self.job.pk, message, level="warn")
            session.commit()
