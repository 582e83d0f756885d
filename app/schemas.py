"""Request bodies (validated at the edge) and the OpenAI-shaped objects the API returns."""

from __future__ import annotations

from typing import Annotated, Literal

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


class LoraIn(Strict):
    r: Annotated[int, Field(ge=1, le=256)] = 8
    alpha: Annotated[float, Field(gt=0, le=1024)] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: Annotated[list[str], Field(min_length=1, max_length=64)] | None = None


class QuantizationIn(Strict):
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
GpuClass = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Suffix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class JobCreate(Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    integrations: Annotated[list[dict], Field(max_length=0)] | None = None
    # Lathe extensions, sent through the SDK's extra_body.
    lora: LoraIn = Field(default_factory=LoraIn)
    quantization: QuantizationIn = Field(default_factory=QuantizationIn)
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
