"""The job page's lineage: the base model, the fine-tuned models the job trains on from, then
the job itself, each fine-tuned model linked to the page of the job that trained it.

A job records `lineage` (the base model's name, then each ancestor's fine-tuned model or
checkpoint, oldest first) and `parent` (the immediate ancestor: its model and job id). Only
the immediate parent's job id is on the job, so the older ones are read from each ancestor's
own `parent` in turn: lineage[-1] is the parent's output, lineage[-2] the grandparent's, and
so on, since each job's lineage is its parent's plus the parent's output. A job the team does
not have (or no longer has) ends the walk: the models before it are shown without a link.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_ANCESTORS = 50  # a lineage this deep is a loop in bad data, not a real chain


@dataclass(frozen=True)
class Ancestor:
    model: str  # a base model's name, a fine-tuned model (ft:...) or a checkpoint's
    job_id: str | None  # the job that trained it, when the team has it; None for the base


def _parent(job: Any) -> dict | None:
    parent = getattr(job, "parent", None)
    return parent if isinstance(parent, dict) else None


def lineage_view(job: Any, find_job: Callable[[str], Any | None]) -> list[Ancestor]:
    """The chain from the base model to `job`'s parent; empty for a job trained from a base
    model (its base is on the page already). `find_job` returns the team's job of an id, or
    None."""
    parent = _parent(job)
    if parent is None:
        return []
    lineage = [m for m in getattr(job, "lineage", None) or [] if isinstance(m, str)]
    if len(lineage) < 2:  # not recorded: the base model (Job.model) and the parent's output
        lineage = [str(job.model), str(parent.get("fine_tuned_model") or parent.get("job"))]
    # The jobs that trained lineage[-1], lineage[-2], ...: each ancestor's own parent.
    # lineage[0] is the base model, which no job trained.
    trainers: list[str] = []
    while parent is not None and len(trainers) < min(len(lineage) - 1, MAX_ANCESTORS):
        job_id = parent.get("job")
        ancestor = find_job(job_id) if isinstance(job_id, str) else None
        if ancestor is None:
            break
        trainers.append(ancestor.id)
        parent = _parent(ancestor)
    links = dict(enumerate(reversed(trainers)))  # trainers[0] made lineage[-1]
    offset = len(lineage) - len(trainers)
    return [Ancestor(m, links.get(i - offset)) for i, m in enumerate(lineage)]
