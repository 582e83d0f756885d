"""Fine-tuning jobs: the body that creates one, and the job, its events, its checkpoints
and the models it makes, as the API returns them (OpenAI's shapes, plus Lathe's fields)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from app import models
from app.domain.jobs import JobStatus
from app.schemas.common import ApiObject, Auto, StoredJson, Strict


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
    # base model's default: its declaration's, else its architecture's (all-linear for
    # decoders, the attention query and value projections for BERT-style encoders).
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=64)] | None = None


class TrainingIn(Strict):
    """How the worker trains: what the loss covers, batching, memory and speed options."""

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


# --- What the API returns ----------------------------------------------------------------


class Hyperparameters(StoredJson):
    """The resolved values ("auto" replaced when the job was created)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobError(StoredJson):
    """Why a job failed: OpenAI's {code, message, param} (docs/api.md lists the codes)."""

    code: str
    message: str
    param: str | None


class Supervised(ApiObject):
    hyperparameters: Hyperparameters


class Method(ApiObject):
    type: Literal["supervised"]
    supervised: Supervised


class FineTuningJob(ApiObject):
    """OpenAI's fine-tuning job, as the openai SDK parses it, plus Lathe's `lora`,
    `quantization`, `max_seq_length`, `training` and `stats`."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: Hyperparameters
    model: str
    organization_id: str  # the team's id
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    # The adapter and quantization as resolved at creation (target_modules filled in from
    # the base model's default), the token limit, how the job trains (JobCreate.training
    # as resolved), and what the worker measured:
    # token counts per file before the first step, parameters, throughput, peak memory,
    # a sample (docs/api.md).
    lora: dict[str, Any]
    quantization: dict[str, Any]
    max_seq_length: int
    training: dict[str, Any]
    stats: dict[str, Any]
    integrations: list[dict[str, Any]]  # always empty: Lathe has no integrations
    metadata: dict[str, str] | None
    method: Method


def job_object(job: models.Job, team_id: str) -> FineTuningJob:
    hp = job.hyperparameters
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=job.error,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=hp,
        model=job.model,
        organization_id=team_id,
        result_files=job.result_files or [],
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=job.estimated_finish,
        lora=job.lora,
        quantization=job.quantization,
        max_seq_length=job.max_seq_length,
        training=job.training,
        stats=job.stats or {},
        integrations=[],
        metadata=job.metadata_,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
    )


class FineTuningJobEvent(ApiObject):
    """A line of the job's log; `type` "metrics" events carry the step's numbers in `data`."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


def event_object(event: models.JobEvent) -> FineTuningJobEvent:
    return FineTuningJobEvent.model_validate(event)


class FineTuningJobCheckpoint(ApiObject):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


def checkpoint_object(ckpt: models.Checkpoint, job_id: str) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint(
        id=ckpt.id,
        created_at=ckpt.created_at,
        fine_tuned_model_checkpoint=ckpt.fine_tuned_model_checkpoint,
        fine_tuning_job_id=job_id,
        metrics=ckpt.metrics,
        step_number=ckpt.step_number,
    )


class Model(ApiObject):
    """A base model the deployment offers (owned by "lathe") or a team's fine-tuned model."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Lathe's: "causal" (a decoder, every dataset format) or "encoder" (classifiers only);
    # a fine-tuned model carries its base's; null when that base is no longer offered.
    kind: Literal["causal", "encoder"] | None = None


class ModelList(ApiObject):
    """OpenAI's /v1/models list: every model at once, no paging fields."""

    object: Literal["list"] = "list"
    data: list[Model]
