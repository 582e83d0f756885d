"""What a tracker records about a job: who ran it and how it trains, as plain data read once
from the Job row, so that the trackers never touch the database or a detached ORM object."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.models import Job


@dataclass(frozen=True)
class JobFacts:
    job_id: str
    team: str
    base_model: str  # Job.model: the base, also for a job that trains on from a ft: model
    method: str  # "supervised" | "dpo"
    # W&B's run config, nested: hyperparameters, lora, quantization, training options,
    # files, parent and lineage. MLflow gets it flattened (`params`).
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, job: Job, settings: Settings) -> JobFacts:
        hyperparameters = dict(job.hyperparameters or {})
        base = settings.base_model(job.model)
        multiplier = hyperparameters.get("learning_rate_multiplier")
        parent = getattr(job, "parent", None)
        config: dict[str, Any] = {
            "job_id": job.id,
            "base_model": job.model,
            "method": getattr(job, "method", None) or "supervised",
            "hyperparameters": hyperparameters,
            # What the optimizer used: the base model's rate times the job's multiplier.
            "learning_rate": (
                base.learning_rate * multiplier if base is not None and multiplier else None
            ),
            "lora": job.lora,
            "quantization": job.quantization,
            "training": job.training or {},
            "max_seq_length": job.max_seq_length,
            "seed": job.seed,
            "suffix": job.suffix,
            "training_file": job.training_file,
            "validation_file": job.validation_file,
            # The parent without its object-store key (storage is the operator's business).
            "parent": {k: v for k, v in parent.items() if k != "storage_key"} if parent else None,
            "lineage": list(getattr(job, "lineage", None) or []),
        }
        return cls(
            job_id=job.id,
            team=job.team.name,
            base_model=job.model,
            method=config["method"],
            config=config,
        )

    @property
    def params(self) -> dict[str, str]:
        """The config as MLflow params: nested keys joined with dots ("lora.r",
        "hyperparameters.beta"), lists as JSON, unset values left out."""
        return flatten(self.config)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value))
        elif value is not None:
            flat[name] = str(value)
    return flat
