"""The compare page's tables: the options that differ between jobs (and those that do
not), and each job's final figures side by side.

Options are compared as stored (resolved hyperparameters, lora, quantization, training
options...), so "auto" and the value it resolved to are different options, as they are
for the worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.models import Job
from app.web.chart import latest

# The options' order on the page: by the prefix of their name, then as the job holds them.
SECTIONS = (
    "model",
    "trains on from",
    "method",
    "data_format",
    "training_file",
    "validation_file",
    "hyperparameters.",
    "max_seq_length",
    "lora.",
    "quantization.",
    "training.",
    "gpus",
    "parallelism",
    "gpu_class",
    "priority",
    "seed",
    "suffix",
)


@dataclass(frozen=True)
class OptionRow:
    name: str
    values: list[object]  # one per job, None where the job has no such option

    @property
    def differs(self) -> bool:
        return any(v != self.values[0] for v in self.values[1:])


def job_options(job: Job) -> dict[str, object]:
    """What the job was created with, one flat name per option."""
    parent = job.parent if isinstance(job.parent, dict) else {}
    options: dict[str, object] = {
        "model": job.model,
        "trains on from": parent.get("fine_tuned_model"),
        "method": job.method,
        "data_format": job.data_format,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
    }
    for prefix, values in (
        ("hyperparameters", job.hyperparameters),
        ("lora", job.lora),
        ("quantization", job.quantization),
        ("training", job.training),
    ):
        for name, value in (values or {}).items():
            options[f"{prefix}.{name}"] = value
    options |= {
        "max_seq_length": job.max_seq_length,
        "gpus": job.gpus,
        "parallelism": job.parallelism,
        "gpu_class": job.gpu_class,
        "priority": job.priority,
        "seed": job.seed,
        "suffix": job.suffix,
    }
    return options


def _section(name: str) -> int:
    return next(
        (
            i
            for i, s in enumerate(SECTIONS)
            if name == s or (s.endswith(".") and name.startswith(s))
        ),
        len(SECTIONS),
    )


def option_rows(jobs: list[Job]) -> tuple[list[OptionRow], list[OptionRow]]:
    """(the options whose values differ between the jobs, those all the jobs share)."""
    options = [job_options(job) for job in jobs]
    names = list(dict.fromkeys(name for each in options for name in each))
    names.sort(key=_section)  # stable: within a section, the jobs' own order
    rows = [OptionRow(name, [each.get(name) for each in options]) for name in names]
    return [r for r in rows if r.differs], [r for r in rows if not r.differs]


@dataclass(frozen=True)
class Figures:
    """A compared job's final figures: the last logged losses (and a DPO job's reward
    accuracy) with their step, and what the job's record says."""

    train_loss: tuple[int, float] | None
    valid_loss: tuple[int, float] | None
    valid_reward_accuracy: tuple[int, float] | None
    duration: int | None  # seconds from start to finish


def figures(job: Job, rows: list[dict]) -> Figures:
    duration = None
    if job.started_at is not None and job.finished_at is not None:
        duration = max(0, job.finished_at - job.started_at)
    return Figures(
        train_loss=latest(rows, "train_loss"),
        valid_loss=latest(rows, "valid_loss"),
        valid_reward_accuracy=latest(rows, "valid_reward_accuracy"),
        duration=duration,
    )
