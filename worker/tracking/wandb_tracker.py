"""Weights & Biases: one run per job, as OpenAI's W&B integration makes it (the run's id is
the job's id, the display name the job's `name` or its id, "lathe/..." tags beside the
job's own), with the key, host and mode the operator gives the worker (LATHE_WANDB_*).

W&B logs asynchronously (its wandb-core process uploads), so only `start` and `finish`
wait on the network, each bounded by a timeout. Every call may raise;
worker.tracking.job_tracking catches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.domain.jobs import JobStatus
from worker.tracking.job_facts import JobFacts

INIT_TIMEOUT_S = 20.0  # W&B's default: 90 s
# The adapter is uploaded at the end; past this, W&B gives up, keeps the rest on the
# worker's disk (`wandb sync` uploads it) and finish raises, which becomes a warning.
# Two minutes: the job has already succeeded, and this holds its GPU slot.
FINISH_TIMEOUT_S = 120.0
TAG_LIMIT = 64  # W&B's longest tag


class WandbTracker:
    name = "Weights & Biases"
    key = "wandb"  # in the job's stats.tracking

    def __init__(
        self,
        options: dict[str, Any],
        job: JobFacts,
        directory: Path,
        *,
        api_key: str | None,
        base_url: str | None,
        mode: str | None,
    ) -> None:
        self.project: str = options["project"]
        self.entity: str | None = options.get("entity")
        self.run_name: str = options.get("name") or job.job_id
        lathe_tags = ["lathe/finetune", f"lathe/{job.base_model}", f"lathe/{job.job_id}"]
        self.tags = [t[:TAG_LIMIT] for t in [*(options.get("tags") or []), *lathe_tags]]
        self.job = job
        self.directory = directory
        self.settings: dict[str, Any] = {
            "finish_timeout": FINISH_TIMEOUT_S,
            "finish_timeout_raises": True,
            # The job process's output, the worker's git checkout and installed packages,
            # and its machine are Lathe's, not the run's: none of them is sent. System
            # metrics are off too (their sampler probes cloud metadata addresses).
            "console": "off",
            "silent": True,
            "disable_git": True,
            "save_code": False,
            "x_save_requirements": False,
            "x_disable_stats": True,
            "x_disable_machine_info": True,
        }
        for name, value in (("api_key", api_key), ("base_url", base_url), ("mode", mode)):
            if value:
                self.settings[name] = value
        self.run: Any = None

    def start(self) -> dict[str, Any]:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.run_name,
            # The job's id, so that a resumed attempt (after a pause) continues the run.
            id=self.job.job_id,
            resume="allow",
            tags=self.tags,
            config=self.job.config,
            dir=str(self.directory),
            reinit="create_new",
            settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, **self.settings),
        )
        return {"url": self.run.url, "run_id": self.run.id}

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_report(self, kind: str, data: dict) -> None:
        self.run.summary[f"lathe/{kind}"] = data

    def log_artifact(self, path: Path) -> None:
        import wandb

        artifact = wandb.Artifact(
            f"{self.job.job_id}-adapter",
            type="model",
            metadata={"base_model": self.job.base_model, "method": self.job.method},
        )
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        self.run.summary["lathe/status"] = status
        if status == JobStatus.PAUSED:
            # W&B's way to say the run will resume: preempting, then a non-zero exit,
            # shows the run as preempted rather than failed.
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == JobStatus.SUCCEEDED else 1)
