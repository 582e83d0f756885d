"""Exports as the API serves them: a team's fine-tuned model (or one of its checkpoints)
written out as merged 16-bit weights or GGUF, by a worker, as pool work.

An export is a row of `jobs` of kind "export" (app/models.py): queued, dispatched by the
same fair-share scheduler, claimed and fenced, metered in GPU seconds, cancelled, with
events, like a training job. Its result files are the team's (fine-tune-results). The
worker's side is worker/job_export.py.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import BaseModelSpec, Settings
from app.domain.architectures import ModelKind
from app.domain.ids import new_id
from app.domain.jobs import JobKind, JobStatus, is_final
from app.errors import BadRequest, Conflict, NotFound
from app.models import File, Job, JobEvent, Team, now
from app.schemas.exports import ExportCreate
from app.services import lifecycle
from app.services.base_models import describe
from app.services.events import add_event
from app.services.job_parents import resolve_parent
from app.services.jobs import (
    check_fits_pool,
    check_new_job_quota,
    get_checkpoint,
    get_job,
    note_if_no_worker,
)
from app.services.locks import lock_team
from app.services.pagination import newest_first_page

# Tokenizer files llama.cpp's converter reads (SentencePiece's model, or a tokenizers JSON);
# a model with neither (a byte tokenizer such as ByT5's) cannot become a GGUF.
GGUF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def create_export(
    session: Session, settings: Settings, team: Team, job_id: str, body: ExportCreate
) -> Job:
    source = get_job(session, team, job_id)  # another team's job: 404, as for the job itself
    lock_team(session, team)  # as job creation: a concurrent delete of the adapter file waits
    checkpoint = None
    if body.checkpoint is not None:
        # Found among the job's own checkpoints, else 404 (another job's, another team's).
        checkpoint = get_checkpoint(session, team, job_id, body.checkpoint)
        name = checkpoint.fine_tuned_model_checkpoint
    elif source.status != JobStatus.SUCCEEDED or not source.fine_tuned_model:
        raise Conflict(
            f"job {source.id} is {source.status}; only a succeeded job's model can be "
            "exported (or one of its checkpoints: pass `checkpoint`)",
            code="job_not_succeeded",
            param="fine_tuning_job_id",
        )
    else:
        name = source.fine_tuned_model
    parent = resolve_parent(session, settings, team, name)
    spec = body.stored()
    check_exportable(settings, parent.base, spec)
    check_new_job_quota(session, settings, team)
    gpu_class = body.gpu_class or settings.export_gpu_class
    classes = check_fits_pool(session, settings, gpu_class, 0.0)
    spec |= {
        "model": name,
        "checkpoint": checkpoint.id if checkpoint else None,
        "step_number": checkpoint.step_number if checkpoint else None,
    }
    export = Job(
        id=new_id("ftexp"),
        team_pk=team.pk,
        kind=JobKind.EXPORT.value,
        source_job_pk=source.pk,
        export=spec,
        model=source.model,
        training_file=source.training_file,
        status=JobStatus.VALIDATING_FILES.value,
        method=source.method,
        hyperparameters={},
        parent=parent.parent,
        lineage=parent.lineage,
        lora=source.lora,
        quantization=source.quantization,
        training={},
        max_seq_length=source.max_seq_length,
        data_format=source.data_format,
        seed=source.seed,
        result_files=[],
        priority=body.priority,
        gpu_class=gpu_class,
        # A merge streams on the CPU, a shard at a time: it asks nothing of the GPU, so it
        # fits every class (export_gpu_class can keep exports off the GPUs altogether).
        memory_gb=0.0,
    )
    session.add(export)
    session.flush()
    add_event(session, export.pk, f"Export of {name} requested: {describe_export(spec)}", data=spec)
    note_if_no_worker(session, settings, export, classes)
    lifecycle.transition(session, export, JobStatus.QUEUED, "Export queued")
    session.commit()
    return export


def describe_export(spec: dict) -> str:
    """ "merged weights, bfloat16, merged into the NF4 base" and the like, for events."""
    if spec["format"] == "gguf":
        what = f"GGUF, {spec['quantization']}"
    else:
        what = f"merged weights, {spec['dtype']}"
    into = "NF4-dequantized" if spec["base_weights"] == "nf4" else "original 16-bit"
    return f"{what}, the adapter merged into the {into} base weights"


def check_exportable(settings: Settings, base: BaseModelSpec, spec: dict) -> None:
    """Refuse at once what the worker could only fail on: GGUF of a classifier (llama.cpp
    runs generative models) or of a model whose tokenizer its converter cannot read."""
    if spec["format"] != "gguf":
        return
    facts = describe(settings, base)
    if facts.kind is ModelKind.ENCODER:
        raise BadRequest(
            f"model {base.name!r} is an encoder classifier; GGUF is for generative models "
            "(llama.cpp, Ollama): export it with format 'merged'",
            code="unsupported_export_for_model",
            param="format",
        )
    local = None if base.path and base.path.startswith("s3://") else settings.base_model_path(base)
    if local is not None and local.is_dir() and not _has_gguf_tokenizer(local):
        raise BadRequest(
            f"model {base.name!r} has a tokenizer llama.cpp cannot convert (neither "
            f"{' nor '.join(GGUF_TOKENIZER_FILES)}); export it with format 'merged'",
            code="unsupported_export_for_model",
            param="format",
        )


def _has_gguf_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in GGUF_TOKENIZER_FILES)


def get_export(session: Session, team: Team, job_id: str, export_id: str) -> Job:
    source = get_job(session, team, job_id)
    export = session.scalar(
        select(Job).where(
            Job.id == export_id,
            Job.team_pk == team.pk,
            Job.kind == JobKind.EXPORT,
            Job.source_job_pk == source.pk,
        )
    )
    if export is None:
        raise NotFound(
            f"fine-tuning job {source.id} has no export with id {export_id!r}",
            code="export_not_found",
            param="export_id",
        )
    return export


def list_exports(session: Session, team: Team, job_id: str, limit: int, after: str | None):
    source = get_job(session, team, job_id)
    scope = (Job.source_job_pk == source.pk) & (Job.kind == JobKind.EXPORT)
    return newest_first_page(session, Job, scope, limit, after)


def cancel_export(session: Session, team: Team, job_id: str, export_id: str) -> Job:
    """A queued export leaves the line; a running one's worker stops it (the converter is
    killed), and nothing of it is published."""
    export = get_export(session, team, job_id, export_id)
    if is_final(JobStatus(export.status)) or not lifecycle.transition(
        session, export, JobStatus.CANCELLED, "Export cancelled", finished_at=now()
    ):
        session.rollback()
        export = get_export(session, team, job_id, export_id)
        raise Conflict(
            f"export {export.id} has already ended ({export.status}); it cannot be cancelled",
            code="export_not_cancellable",
            param="export_id",
        )
    session.commit()
    return export


def list_export_events(
    session: Session, team: Team, job_id: str, export_id: str, limit: int, after: str | None
):
    export = get_export(session, team, job_id, export_id)
    return newest_first_page(session, JobEvent, JobEvent.job_pk == export.pk, limit, after)


def export_files(session: Session, team: Team, exports: list[Job]) -> dict[str, File]:
    """The result files of these exports, by id, in one query."""
    ids = [i for export in exports for i in export.result_files or [] if isinstance(i, str)]
    if not ids:
        return {}
    rows = session.scalars(select(File).where(File.team_pk == team.pk, File.id.in_(ids)))
    return {f.id: f for f in rows}
