"""A job's experiment tracking: the trackers its integrations ask for, each guarded so that
tracking never fails training.

Any error from a tracker (its server down or slow, a refused key, a library error) stops
that tracker for the rest of the run and is said once through `on_warning` (the job
process makes it a warn event); training and the other tracker go on. An integration the
worker is not configured for is skipped the same way. No method here raises.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from app.config import Settings
from app.models import Job
from worker.tracking.job_facts import JobFacts
from worker.tracking.mlflow_tracker import MlflowTracker
from worker.tracking.wandb_tracker import WandbTracker

log = logging.getLogger(__name__)

# A metrics row's fields that are not per-step figures: `step` is the x axis.
NOT_METRICS = frozenset({"step", "total_steps"})


class Tracker(Protocol):
    name: str  # in warnings: "MLflow", "Weights & Biases"
    key: str  # in the job's stats.tracking: "mlflow", "wandb"

    def start(self) -> dict[str, Any]: ...
    def log_metrics(self, step: int, values: dict[str, float]) -> None: ...
    def log_report(self, kind: str, data: dict) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def finish(self, status: str) -> None: ...


class Tracking:
    """The job process's trackers. Built by `for_job`; `start` before training, then
    `log_metrics` per metrics row and `log_report` per report, and after publishing
    `log_artifact` (the adapter archive) and `finish` with the job's outcome."""

    def __init__(
        self,
        trackers: list[Tracker],
        on_warning: Callable[[str], None] | None = None,
        skipped: list[str] | None = None,
    ) -> None:
        self.trackers = trackers
        self.on_warning = on_warning or (lambda message: None)
        self.skipped = skipped or []  # warnings given at start, once on_warning is wired
        self.stopped: set[str] = set()  # keys of trackers stopped by an error
        self.finished = False

    @classmethod
    def for_job(
        cls,
        job: Job,
        settings: Settings,
        workdir: Path,
        *,
        on_warning: Callable[[str], None] | None = None,
    ) -> Tracking:
        """The trackers `job.integrations` asks for, among those `settings` configures.
        W&B's run files go under WANDB_DIR when the worker sets it (offline runs kept for
        `wandb sync`), else in `workdir`, deleted with the job's scratch directory."""
        integrations = getattr(job, "integrations", None) or []
        if not integrations:
            return cls([], on_warning)
        trackers: list[Tracker] = []
        skipped: list[str] = []
        try:
            facts = JobFacts.of(job, settings)
        except Exception as exc:  # a job row this code does not expect: train untracked
            log.exception("job %s: cannot describe it to its trackers", job.id)
            return cls([], on_warning, [f"Tracking skipped: {cause(exc)}; training goes on"])
        for integration in integrations:
            kind = integration.get("type")
            try:
                tracker = _tracker(kind, integration.get(kind) or {}, facts, settings, workdir)
            except Skipped as skip:
                skipped.append(f"{skip}; training goes on")
            except Exception as exc:  # a malformed entry (the API validates them)
                skipped.append(f"Tracking skipped for {kind!r}: {cause(exc)}; training goes on")
            else:
                trackers.append(tracker)
        return cls(trackers, on_warning, skipped)

    @property
    def active(self) -> bool:
        """Whether any tracker still logs."""
        return any(t.key not in self.stopped for t in self.trackers) and not self.finished

    def start(self) -> dict[str, dict[str, Any]]:
        """Start each tracker's run. What the job shows in stats.tracking: by tracker,
        its run's id and URL (None where it has none: an offline W&B run, a non-HTTP
        MLflow store) and MLflow's experiment id."""
        for message in self.skipped:
            self._warn(message)
        runs: dict[str, dict[str, Any]] = {}
        for tracker in self.trackers:
            started = self._call(tracker, tracker.start)
            if started is not None:
                runs[tracker.key] = started
        return runs

    def describe(self, runs: dict[str, dict[str, Any]]) -> str:
        """`start`'s runs in words: each tracker's run URL, else its run id."""
        names = {t.key: t.name for t in self.trackers}
        return ", ".join(
            f"{names.get(key, key)} {run.get('url') or 'run ' + str(run.get('run_id'))}"
            for key, run in runs.items()
        )

    def log_metrics(self, row: dict) -> None:
        """A metrics row's numeric fields (train_loss, valid_loss, learning_rate, epoch,
        DPO's rewards...) at its step."""
        values = {
            key: float(value)
            for key, value in row.items()
            if key not in NOT_METRICS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        }
        if values and "step" in row:
            for tracker in self.trackers:
                self._call(tracker, tracker.log_metrics, int(row["step"]), values)

    def log_report(self, kind: str, data: dict) -> None:
        """A report's figures (tokens, model, throughput, sample, classification): W&B's
        run summary, an MLflow JSON artifact under lathe/."""
        for tracker in self.trackers:
            self._call(tracker, tracker.log_report, kind, data)

    def log_artifact(self, path: Path) -> None:
        """The adapter archive: an MLflow artifact, a W&B artifact of type "model"."""
        for tracker in self.trackers:
            self._call(tracker, tracker.log_artifact, path)

    def finish(self, status: str) -> None:
        """End the runs with the job's outcome: "succeeded", "failed", "cancelled" or
        "paused" (the next attempt continues the same runs). Only the first call counts."""
        if self.finished:
            return
        self.finished = True
        for tracker in self.trackers:
            self._call(tracker, tracker.finish, status)

    def _call(self, tracker: Tracker, method: Callable[..., Any], *args: Any) -> Any:
        # After finish, a late row or report has no run to go to (W&B's would raise).
        if tracker.key in self.stopped or (self.finished and method != tracker.finish):
            return None
        try:
            return method(*args)
        except Exception as exc:
            self.stopped.add(tracker.key)
            log.warning("%s tracking stopped", tracker.name, exc_info=True)
            self._warn(f"{tracker.name} tracking stopped: {cause(exc)}; training goes on")
            return None

    def _warn(self, message: str) -> None:
        try:
            self.on_warning(message)
        except Exception:  # the warning's own write failed: the log has it
            log.warning("%s (the job's event could not be written)", message, exc_info=True)


class Skipped(Exception):
    """An integration this worker is not configured for."""


def _tracker(
    kind: str | None, options: dict, facts: JobFacts, settings: Settings, workdir: Path
) -> Tracker:
    if kind == "mlflow":
        uri = getattr(settings, "mlflow_tracking_uri", None)
        if not uri:
            raise Skipped("MLflow tracking skipped: this worker has no LATHE_MLFLOW_TRACKING_URI")
        return MlflowTracker(uri, options["experiment"], options.get("run_name"), facts)
    if kind == "wandb":
        api_key = getattr(settings, "wandb_api_key", None)
        mode = getattr(settings, "wandb_mode", None)
        if api_key is None and mode != "offline":
            raise Skipped(
                "Weights & Biases tracking skipped: this worker has no LATHE_WANDB_API_KEY "
                "(nor LATHE_WANDB_MODE=offline)"
            )
        return WandbTracker(
            options,
            facts,
            Path(os.environ.get("WANDB_DIR") or workdir),
            api_key=api_key.get_secret_value() if api_key is not None else None,
            base_url=getattr(settings, "wandb_base_url", None),
            mode=mode,
        )
    raise Skipped(f"Tracking skipped for integration type {kind!r}: unknown to this worker")


def cause(exc: BaseException, limit: int = 300) -> str:
    """An error in one line. A network failure is named by its root (the deepest OSError
    it was raised from: "ConnectionRefusedError: [Errno 111] Connection refused"), not by
    the client's wrapper, whose message runs to pages of retry history."""
    chain, seen = [exc], {id(exc)}
    while (inner := chain[-1].__cause__ or chain[-1].__context__) and id(inner) not in seen:
        chain.append(inner)
        seen.add(id(inner))
    network = [e for e in chain[1:] if isinstance(e, OSError)]
    shown = network[-1] if network else exc
    lines = str(shown).strip().splitlines()
    text = f"{type(shown).__name__}: {lines[0]}" if lines else type(shown).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
