"""Request bodies (validated at the edge) and the OpenAI-shaped objects the API returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Header, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app import models

Auto = Literal["auto"]


class Strict(BaseModel):
    # Unknown fields are a client's typo ("lora_r"), refused with the field named.
    model_config = ConfigDict(extra="forbid")


class HyperparametersIn(Strict):
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto = "auto"


class SupervisedIn(Strict):
    hyperparameters: HyperparametersIn | None = None


class MethodIn(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedIn | None = None


ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.*-]{1,128}$")]


class LoraIn(Strict):
    r: Annotated[int, Field(ge=1, le=256)] = 8
    alpha: Annotated[float, Field(gt=0, le=1024)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    # Module names, or ["all-linear"]: every linear layer but the output head. None: the
    # base model's default (all-linear unless the deployment says otherwise).
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=64)] | None = None


class TrainingIn(Strict):
    """How the worker trains: what the loss covers, batching, memory and speed levers."""

    # Loss on prompts and user turns too, not only on what the model should write.
    train_on_inputs: bool = False
    # Examples longer than max_seq_length: cut to it, or fail the job naming their lines.
    truncation: Literal["truncate", "refuse"] = "truncate"
    # Padding-free batches: examples concatenated with per-example positions (chat,
    # prompt/completion and text; classification is always padded).
    packing: bool = True
    # Recompute activations in the backward pass: far less memory, ~30% more compute.
    # auto: on a GPU, not on the CPU.
    gradient_checkpointing: bool | Auto = "auto"
    # auto: bitsandbytes' paged 8-bit AdamW on a GPU (as in the QLoRA paper), AdamW on the CPU.
    optimizer: Literal[
        "auto", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"
    ] = "auto"
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Evaluate the validation file every this many steps (and at every epoch end);
    # None: about ten times over the run.
    eval_steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    # Tokens of the generation sample shown at the end of a chat job; 0: no sample.
    sample_max_new_tokens: Annotated[int, Field(ge=0, le=1024)] = 64


class QuantizationIn(Strict):
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
GpuClass = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Suffix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# --- Rules said in the OpenAPI document -----------------------------------------------------
# What the API refuses for its form alone is stated in the document (pattern, bounds), so
# the document, generated clients and the docs match the validation; tests/api/test_fuzz.py
# checks that no request valid by the document is refused for its form. The rules below are
# enforced by the services, which answer with their own codes (invalid_cursor,
# invalid_period, invalid_url, denied_url), so they are put in the document only
# (json_schema_extra) rather than checked a second time by FastAPI with a generic code.

ID_PATTERN = "^{prefix}-[0-9a-f]{{24}}$"  # app.domain.ids.new_id


def _pattern(pattern: str) -> Callable[[dict[str, Any]], None]:
    """json_schema_extra: the pattern on the string (not the null) of an optional value."""

    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "string":
                branch["pattern"] = pattern

    return extra


def _documented_query(pattern: str, description: str) -> Any:
    return Query(description=description, json_schema_extra=_pattern(pattern))


def cursor(prefix: str) -> Any:
    """An optional `after` query parameter: the id of an object of the list (`ftjob-...`).
    Any other value, well-formed or not, is 400 invalid_cursor (app.services.pagination)."""
    return Annotated[
        str | None,
        _documented_query(
            ID_PATTERN.format(prefix=prefix),
            f"Continue after this object of the list (its id, `{prefix}-...`)",
        ),
    ]


JobCursor = cursor("ftjob")
EventCursor = cursor("ftevent")
CheckpointCursor = cursor("ftckpt")
FileCursor = cursor("file")
TeamCursor = cursor("team")
AuditCursor = cursor("audit")
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description="The last event received (`ftevent-...`): the stream resumes after it",
        json_schema_extra=_pattern(ID_PATTERN.format(prefix="ftevent")),
    ),
]
# A file purpose to list by ("fine-tune", "fine-tune-results"); another name lists nothing.
PurposeFilter = Annotated[
    str | None, _documented_query(r"^[a-z][a-z0-9_-]{0,63}$", "Only files of this purpose")
]
# A calendar month (app.services.usage.period_bounds: else 400 invalid_period).
Period = Annotated[
    str | None,
    _documented_query(
        r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$", "A calendar month, YYYY-MM (UTC); default: this month"
    ),
]

# A webhook's url, as app.services.webhooks accepts it (else 400 invalid_url): http(s), a
# host (an IPv4 address, an IPv6 address in brackets, or a name of letters, digits, "-"
# and "_" labels, not four numbers), an optional port, printable characters after it; no
# user:password@. Which hosts may be called (denied_url) is the deployment's, not a form.
_LABEL = "[A-Za-z0-9_-]{1,63}"
_NAME_LABEL = "[A-Za-z0-9_-]{0,31}[A-Za-z_-][A-Za-z0-9_-]{0,31}"  # not only digits
_NUMBERS = "[0-9]{1,63}(?:\\.[0-9]{1,63}){0,2}"  # "0", "127.1": names to a resolver
_NAME = f"(?:(?:{_LABEL}\\.)*{_NAME_LABEL}(?:\\.{_LABEL})*|{_NUMBERS})\\.?"
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(?:\\.{_OCTET}){{3}}"
_H16 = "[0-9A-Fa-f]{1,4}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4})"


def _ipv6() -> str:
    """RFC 3986's IPv6address (section 3.2.2), as a regular expression."""

    def groups(n: int) -> str:
        return f"(?:{_H16}:){{{n}}}" if n else ""

    def head(n: int) -> str:  # [ *n( h16 ":" ) h16 ]
        return f"(?:(?:{_H16}:){{0,{n}}}{_H16})?" if n else f"(?:{_H16})?"

    forms = [f"{groups(6)}{_LS32}", f"::{groups(5)}{_LS32}"]
    forms += [f"{head(n)}::{groups(4 - n)}{_LS32}" for n in range(4)]
    forms += [f"{head(4)}::{_LS32}", f"{head(5)}::{_H16}", f"{head(6)}::"]
    return "|".join(f"(?:{form})" for form in forms)


_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
WEBHOOK_URL_PATTERN = (
    f"^https?://(?:{_IPV4}|\\[(?:{_ipv6()})\\]|{_NAME})(?::{_PORT})?(?:[/?#][^\\x00-\\x20\\x7f]*)?$"
)
WebhookUrl = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        description="An http(s) URL with a host, no user:password@",
        json_schema_extra=_pattern(WEBHOOK_URL_PATTERN),
    ),
]


class JobCreate(Strict):
    model: Annotated[str, Field(min_length=1)]
    training_file: Annotated[str, Field(min_length=1)]
    validation_file: Annotated[str, Field(min_length=1)] | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    integrations: Annotated[list[dict], Field(max_length=0)] | None = None
    # Lathe extensions, sent through the SDK's extra_body.
    lora: LoraIn = Field(default_factory=LoraIn)
    quantization: QuantizationIn = Field(default_factory=QuantizationIn)
    training: TrainingIn = Field(default_factory=TrainingIn)
    max_seq_length: Annotated[int, Field(ge=16, le=32768)] = 1024
    priority: Literal["low", "normal", "high"] = "normal"
    gpu_class: GpuClass | None = None

    def requested_hyperparameters(self) -> HyperparametersIn:
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or HyperparametersIn()


def file_object(f: models.File) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "status_details": f.status_details,
        "expires_at": None,
    }


def job_object(job: models.Job, team_id: str) -> dict:
    hp = job.hyperparameters
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": hp,
        "model": job.model,
        "organization_id": team_id,
        "result_files": job.result_files or [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish,
        # Lathe extensions: how the job trains, and what the worker measured (token counts
        # per file before the first step, parameters, throughput, peak memory, a sample).
        "training": job.training,
        "stats": job.stats or {},
        "integrations": [],
        "metadata": job.metadata_,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }


def event_object(event: models.JobEvent) -> dict:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def checkpoint_object(ckpt: models.Checkpoint, job_id: str) -> dict:
    return {
        "id": ckpt.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": ckpt.created_at,
        "fine_tuned_model_checkpoint": ckpt.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": job_id,
        "metrics": ckpt.metrics,
        "step_number": ckpt.step_number,
    }


def list_envelope(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
