"""The job page's exports (docs/exports.md): the forms' fields read into the API's request
body, and each export laid out for the table (its options in words, its files, whether it
can still be cancelled). The routes are in app/web/views.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from pydantic import TypeAdapter, ValidationError

from app.domain.jobs import FINAL_STATES
from app.models import File, Job
from app.schemas.exports import (
    DEFAULT_DTYPE,
    DEFAULT_GGUF_QUANTIZATION,
    ExportCreate,
    FineTuningJobExport,
    GgufExportCreate,
    MergedExportCreate,
    export_object,
)

FINAL = {s.value for s in FINAL_STATES}
# The choices are the request models' own, so the forms offer what the API accepts.
MERGED_DTYPES: tuple[str, ...] = get_args(MergedExportCreate.model_fields["dtype"].annotation)
GGUF_QUANTIZATIONS: tuple[str, ...] = get_args(
    GgufExportCreate.model_fields["quantization"].annotation
)
_REQUEST: TypeAdapter[Any] = TypeAdapter(ExportCreate)
BASE_WEIGHTS = (
    ("nf4", "the NF4 base it was trained against (default)"),
    ("original", "the original 16-bit base weights"),
)


@dataclass(frozen=True)
class ExportRow:
    export: FineTuningJobExport
    options: str
    total_bytes: int
    cancellable: bool


@dataclass(frozen=True)
class FormChoices:
    """What the export forms offer, with the defaults selected."""

    dtypes: tuple[str, ...] = MERGED_DTYPES
    dtype: str = DEFAULT_DTYPE
    quantizations: tuple[str, ...] = GGUF_QUANTIZATIONS
    quantization: str = DEFAULT_GGUF_QUANTIZATION
    base_weights: tuple[tuple[str, str], ...] = BASE_WEIGHTS


def options_text(export: FineTuningJobExport) -> str:
    """ "merged, bfloat16, NF4 base" or "GGUF, q8_0, original base"."""
    kind = f"GGUF, {export.quantization}" if export.format == "gguf" else f"merged, {export.dtype}"
    base = "NF4 base" if export.base_weights == "nf4" else "original base"
    return f"{kind}, {base}"


def export_rows(exports: list[Job], job_id: str, files: dict[str, File]) -> list[ExportRow]:
    rows = []
    for row in exports:
        export = export_object(row, job_id, files)
        rows.append(
            ExportRow(
                export=export,
                options=options_text(export),
                total_bytes=sum(f.bytes for f in export.files),
                cancellable=export.status not in FINAL,
            )
        )
    return rows


def export_request(
    format_: str, dtype: str, quantization: str, base_weights: str, checkpoint: str
) -> MergedExportCreate | GgufExportCreate | str:
    """The request the form asks for, or what is wrong with it (a form sent by hand). A
    field of the other format is left out (a merged export has no quantization, a GGUF
    none of dtype), so one form could carry both."""
    fields: dict[str, object] = {"format": format_, "checkpoint": checkpoint or None}
    if base_weights:
        fields["base_weights"] = base_weights
    if format_ == "merged" and dtype:
        fields["dtype"] = dtype
    if format_ == "gguf" and quantization:
        fields["quantization"] = quantization
    try:
        return _REQUEST.validate_python(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"].startswith("union_tag"):  # no such format: no model to check with
            return f"Invalid format: {format_[:40]!r} is neither 'merged' nor 'gguf'."
        field = str(error["loc"][-1]) if error.get("loc") else "export"
        return f"Invalid {field}: {error.get('msg', 'invalid value')}."
