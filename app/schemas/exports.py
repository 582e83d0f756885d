"""Exports of a fine-tuned model: the body that asks for one, and the export as the API
returns it (Lathe's own resource; OpenAI has none)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from app import models
from app.schemas.common import ApiObject, Strict, cursor
from app.schemas.jobs import GpuClass, JobError

DEFAULT_DTYPE = "bfloat16"
DEFAULT_GGUF_QUANTIZATION = "q8_0"  # near-lossless (docs/exports.md); q4_k_m is 1.9x smaller

ExportCursor = cursor("ftexp")


class _ExportCreate(Strict):
    # What the adapter is merged into (docs/exports.md): "nf4", the weights it was trained
    # against, or "original", the base's own 16-bit weights.
    base_weights: Literal["nf4", "original"] = "nf4"
    # Export this checkpoint's adapter (ftckpt-...) instead of the job's final one.
    checkpoint: str | None = None
    priority: Literal["low", "normal", "high"] = "normal"
    gpu_class: GpuClass | None = None

    def stored(self) -> dict:
        """What Job.export keeps of the request, defaults filled in (the service adds the
        model's name and the checkpoint's step)."""
        return {
            "format": self.format,  # type: ignore[attr-defined]
            "dtype": getattr(self, "dtype", None),
            "quantization": getattr(self, "quantization", None),
            "base_weights": self.base_weights,
        }


class MergedExportCreate(_ExportCreate):
    """A Hugging Face folder of 16-bit weights (vLLM, TGI, transformers)."""

    format: Literal["merged"]
    dtype: Literal["bfloat16", "float16"] = DEFAULT_DTYPE


class GgufExportCreate(_ExportCreate):
    """One GGUF file for llama.cpp and Ollama, with an Ollama Modelfile."""

    format: Literal["gguf"]
    quantization: Literal["f16", "q8_0", "q4_k_m"] = DEFAULT_GGUF_QUANTIZATION


# The body of POST .../exports: its `format` says which options apply (a GGUF has no dtype,
# merged weights no quantization: either is refused as an unknown field).
ExportCreate = Annotated[MergedExportCreate | GgufExportCreate, Field(discriminator="format")]


class ExportFile(ApiObject):
    """One file of the export, downloaded from /v1/files/{id}/content (HTTP Range works);
    `filename` is its path in the exported folder."""

    id: str
    filename: str
    bytes: int


class FineTuningJobExport(ApiObject):
    id: str
    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    fine_tuning_job_id: str
    # The model written out: the job's fine-tuned model, or the checkpoint's.
    model: str | None
    checkpoint_id: str | None
    step_number: int | None
    format: Literal["merged", "gguf"]
    dtype: str | None
    quantization: str | None
    base_weights: str
    status: str
    priority: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    files: list[ExportFile]
    error: JobError | None


def export_object(
    export: models.Job, job_id: str, files: dict[str, models.File]
) -> FineTuningJobExport:
    """`files`: the result files by id (those the team deleted since are left out)."""
    spec, parent = export.export or {}, export.parent or {}
    return FineTuningJobExport(
        id=export.id,
        fine_tuning_job_id=job_id,
        model=spec.get("model"),
        checkpoint_id=parent.get("checkpoint"),
        step_number=spec.get("step_number"),
        format=spec.get("format", "merged"),
        dtype=spec.get("dtype"),
        quantization=spec.get("quantization"),
        base_weights=spec.get("base_weights", "nf4"),
        status=export.status,
        priority=export.priority,
        created_at=export.created_at,
        started_at=export.started_at,
        finished_at=export.finished_at,
        files=[
            ExportFile(id=f.id, filename=f.filename, bytes=f.bytes)
            for file_id in export.result_files or []
            if (f := files.get(file_id)) is not None
        ],
        error=export.error,
    )
