"""Training on from a fine-tuned model: the job's `model` as an ft: name or a checkpoint's
name, resolved to the team's job that made it, the object holding its adapter, its base and
lineage; and the LoRA settings a continuation must share with that adapter."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import BaseModelSpec, Settings
from app.domain.jobs import JobStatus
from app.errors import BadRequest, NotFound
from app.models import Checkpoint, Job, Team
from app.schemas.jobs import LoraIn, job_lineage
from app.services.files import result_files

ADAPTER_ARCHIVE = "adapter.tar.gz"
# The adapter's own shape: a job continuing it trains the same matrices, so these come from
# the parent. Dropout is how a run trains, not part of the adapter: the request's applies.
ADAPTER_SHAPE = ("r", "alpha", "target_modules")


@dataclass(frozen=True)
class ParentModel:
    job: Job
    base: BaseModelSpec
    parent: dict  # Job.parent (app/models.py)
    lineage: list[str]


def _find(session: Session, team: Team, name: str) -> tuple[Job, Checkpoint | None] | None:
    """The team's job whose fine-tuned model, or one of whose checkpoints, is `name`."""
    job = session.scalars(
        select(Job)
        .where(Job.team_pk == team.pk, Job.fine_tuned_model == name)
        .order_by(Job.pk.desc())
    ).first()
    if job is not None:
        return job, None
    row = session.execute(
        select(Job, Checkpoint)
        .join(Checkpoint, Checkpoint.job_pk == Job.pk)
        .where(Job.team_pk == team.pk, Checkpoint.fine_tuned_model_checkpoint == name)
        .order_by(Checkpoint.pk.desc())
    ).first()
    return None if row is None else (row[0], row[1])


def resolve_parent(session: Session, settings: Settings, team: Team, name: str) -> ParentModel:
    """The fine-tuned model `name` of this team, ready to train on. Another team's model,
    like one that does not exist, is 404 (its existence is not the team's to learn)."""
    found = _find(session, team, name)
    if found is None:
        raise NotFound(
            f"model {name!r} does not exist, or is not a fine-tuned model of this team",
            code="model_not_found",
            param="model",
        )
    job, checkpoint = found
    if job.status != JobStatus.SUCCEEDED or not job.fine_tuned_model:
        raise BadRequest(
            f"model {name!r} comes from job {job.id}, which is {job.status}; only a "
            "succeeded job's model or checkpoints can be trained on",
            code="model_not_ready",
            param="model",
        )
    base = settings.base_model(job.model)
    if base is None:
        raise BadRequest(
            f"model {name!r} was fine-tuned from {job.model!r}, which this deployment no "
            "longer offers",
            code="model_not_found",
            param="model",
        )
    if checkpoint is not None:
        storage_key, archive = checkpoint.storage_key, "checkpoint"
    else:
        adapter = result_files(session, team, job).get(ADAPTER_ARCHIVE)
        if adapter is None:
            raise BadRequest(
                f"the adapter of model {name!r} ({ADAPTER_ARCHIVE} of job {job.id}) was "
                "deleted; train on from one of its checkpoints instead",
                code="model_not_ready",
                param="model",
            )
        storage_key, archive = adapter.storage_key, "adapter"
    return ParentModel(
        job=job,
        base=base,
        parent={
            "fine_tuned_model": job.fine_tuned_model,
            "job": job.id,
            "checkpoint": checkpoint.id if checkpoint else None,
            "storage_key": storage_key,
            "archive": archive,
        },
        lineage=[*job_lineage(job), name],
    )


def continued_lora(requested: LoraIn, parent: Job) -> dict:
    """The LoRA settings of a job continuing `parent`'s adapter: its r, alpha and target
    modules (the request may restate them, not change them), the request's dropout."""
    lora = requested.model_dump()
    for key in ADAPTER_SHAPE:
        theirs = parent.lora.get(key)
        if theirs is None:  # not recorded (an older row): the request's, or the default
            continue
        if key in requested.model_fields_set and not _same(key, lora[key], theirs):
            raise BadRequest(
                f"lora.{key} is {lora[key]!r} but model {parent.fine_tuned_model!r} is an "
                f"adapter with {key} {theirs!r}; training on from it keeps its shape "
                f"(leave lora.{key} out to take the adapter's)",
                code="lora_mismatch",
                param=f"lora.{key}",
            )
        lora[key] = theirs
    return lora


def _same(key: str, ours: object, theirs: object) -> bool:
    if key == "target_modules":
        return sorted(ours or []) == sorted(theirs or [])  # type: ignore[arg-type]
    return ours == theirs
