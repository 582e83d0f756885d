"""Fine-tuning jobs: the body that creates one, and the job, its events, its checkpoints
and the models it makes, as the API returns them (OpenAI's shapes, plus Lathe's fields)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app import models
from app.domain.jobs import JobStatus
from app.schemas.common import ApiObject, Auto, StoredJson, Strict


class HyperparametersIn(Strict):
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto = "auto"


class DpoHyperparametersIn(HyperparametersIn):
    # The strength of the pull towards the reference model (OpenAI's range); auto: 0.1.
    beta: Annotated[float, Field(gt=0, le=2)] | Auto = "auto"


class SupervisedIn(Strict):
    hyperparameters: HyperparametersIn | None = None


class DpoIn(Strict):
    hyperparameters: DpoHyperparametersIn | None = None


def _one_block_for_the_type(schema: dict[str, Any]) -> None:
    """The document says what MethodIn's validator refuses: the block of the other type."""
    schema["anyOf"] = [
        {"properties": {"type": {"const": "supervised"}, "dpo": {"type": "null"}}},
        {
            "properties": {"type": {"const": "dpo"}, "supervised": {"type": "null"}},
            "required": ["type"],
        },
    ]


class MethodIn(Strict):
    """OpenAI's method: its type and that type's block (hyperparameters); the other type's
    block is refused rather than ignored."""

    model_config = ConfigDict(json_schema_extra=_one_block_for_the_type)

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedIn | None = None
    dpo: DpoIn | None = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> MethodIn:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is set but method.type is {self.type!r}")
        return self


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
    # auto: on a GPU with packing, a kernel that takes packed rows' boundaries and builds no
    # quadratic mask (flash_attention_2 where installed, else PyTorch's flex_attention);
    # sdpa otherwise. Provisional until the GPU check measures it (docs/training.md).
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    # Liger's Triton kernels: fused linear cross-entropy (a vocabulary's logits are never
    # held whole), RMSNorm, SwiGLU, RoPE. auto: on a GPU for supervised causal LMs of the
    # types Liger covers; true needs a GPU. Provisional until measured.
    liger: bool | Auto = "auto"
    # Tokens one micro-batch may hold (a batch is trained as micro-batches with gradient
    # accumulation: same steps, same loss). auto: about max_seq_length when packed, a padded
    # batch whole; on a GPU no more than the memory estimate fits. Provisional until measured.
    micro_batch_tokens: Annotated[int, Field(ge=1, le=4_194_304)] | Auto = "auto"
    # Evaluate the validation file every this many steps (and at every epoch end);
    # None: about ten times over the run.
    eval_steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    # Tokens of the generation sample shown at the end of a chat job; 0: no sample.
    sample_max_new_tokens: Annotated[int, Field(ge=0, le=1024)] = 64


class QuantizationIn(Strict):
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


# W&B's own limits: names of at most 128 characters, tags of at most 64.
TrackingName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TrackingTag = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class WandbIn(Strict):
    project: TrackingName
    name: TrackingName | None = None
    entity: TrackingName | None = None
    tags: Annotated[list[TrackingTag], Field(max_length=20)] = Field(default_factory=list)


class MlflowIn(Strict):
    experiment: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    run_name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None


def _block_named_by_type(schema: dict[str, Any]) -> None:
    """The document says what IntegrationIn's validator refuses: a block other than the
    type's, or none."""
    schema["oneOf"] = [
        {
            "properties": {
                "type": {"const": kind},
                kind: {"type": "object"},
                other: {"type": "null"},
            },
            "required": ["type", kind],
        }
        for kind, other in (("wandb", "mlflow"), ("mlflow", "wandb"))
    ]


class IntegrationIn(Strict):
    """A tracker to log the run to: OpenAI's {"type": "wandb", "wandb": {...}} (the run goes
    to `project`), or Lathe's {"type": "mlflow", "mlflow": {...}} (to `experiment` on the
    deployment's MLflow server). The block named by `type` is required, the other refused."""

    model_config = ConfigDict(json_schema_extra=_block_named_by_type)

    type: Literal["wandb", "mlflow"]
    wandb: WandbIn | None = None
    mlflow: MlflowIn | None = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> IntegrationIn:
        other = "mlflow" if self.type == "wandb" else "wandb"
        if getattr(self, self.type) is None:
            raise ValueError(f"type is {self.type!r} but there is no {self.type!r} block")
        if getattr(self, other) is not None:
            raise ValueError(f"type is {self.type!r} but a {other!r} block is set")
        return self

    def stored(self) -> dict[str, Any]:
        """As Job.integrations holds it: the type and its block, every field present."""
        block = getattr(self, self.type)
        return {"type": self.type, self.type: block.model_dump()}


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
GpuClass = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Suffix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def _parallelism_needs_gpus(schema: dict[str, Any]) -> None:
    """The document says what JobCreate's validator refuses: a parallelism for one GPU."""
    schema["anyOf"] = [
        {"properties": {"gpus": {"minimum": 2}}, "required": ["gpus"]},
        {"properties": {"parallelism": {"type": "null"}}},
    ]


class JobCreate(Strict):
    model_config = ConfigDict(json_schema_extra=_parallelism_needs_gpus)

    # A base model, or a fine-tuned model or checkpoint of the team (ft:...); bounded so a
    # name is never echoed back at any length.
    model: Annotated[str, Field(min_length=1, max_length=512)]
    training_file: Annotated[str, Field(min_length=1)]
    validation_file: Annotated[str, Field(min_length=1)] | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    # At most one of each type (a second is refused: each job logs one run per tracker).
    integrations: Annotated[list[IntegrationIn], Field(max_length=2)] | None = None
    # Lathe extensions, sent through the SDK's extra_body.
    lora: LoraIn = Field(default_factory=LoraIn)
    quantization: QuantizationIn = Field(default_factory=QuantizationIn)
    training: TrainingIn = Field(default_factory=TrainingIn)
    max_seq_length: Annotated[int, Field(ge=16, le=32768)] = 1024
    priority: Literal["low", "normal", "high"] = "normal"
    gpu_class: GpuClass | None = None
    # GPUs of one host the job trains on, all at once; the batch is split among them.
    gpus: Annotated[int, Field(ge=1, le=64)] = 1
    # How those GPUs share the work; None: chosen at creation (ddp while the model fits one
    # GPU, else fsdp). Only for gpus > 1.
    parallelism: Literal["ddp", "fsdp"] | None = None

    @field_validator("parallelism")
    @classmethod
    def _parallelism_for_several_gpus(cls, value: str | None, info: ValidationInfo) -> str | None:
        gpus = info.data.get("gpus")
        if value is not None and gpus == 1:
            raise ValueError(
                f"parallelism {value!r} is for a job on several GPUs; this one has gpus 1 "
                "(send gpus >= 2, or no parallelism)"
            )
        return value

    @property
    def method_type(self) -> Literal["supervised", "dpo"]:
        return self.method.type if self.method else "supervised"

    def requested_hyperparameters(self) -> DpoHyperparametersIn:
        """Each value from the method's block where it is given there, else from the
        top-level hyperparameters (OpenAI's older place); beta is only in the dpo block."""
        values = (self.hyperparameters or HyperparametersIn()).model_dump()
        block = self.method and (self.method.supervised or self.method.dpo)
        if block is not None and block.hyperparameters is not None:
            values |= block.hyperparameters.model_dump(
                include=block.hyperparameters.model_fields_set
            )
        return DpoHyperparametersIn(**values)


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


class DpoHyperparameters(Hyperparameters):
    beta: float


class Supervised(ApiObject):
    hyperparameters: Hyperparameters


class Dpo(ApiObject):
    hyperparameters: DpoHyperparameters


class Method(ApiObject):
    """OpenAI's method: the type, its block, and null for the other type's."""

    type: Literal["supervised", "dpo"]
    supervised: Supervised | None
    dpo: Dpo | None


class JobParent(ApiObject):
    """The fine-tuned model a job trains on from: the model, the job that made it, and the
    checkpoint (ftckpt- id) when the job was created from one; null for its final adapter."""

    fine_tuned_model: str
    job: str
    checkpoint: str | None


class Wandb(ApiObject):
    project: str
    name: str | None
    entity: str | None
    tags: list[str]


class WandbIntegration(ApiObject):
    """OpenAI's integration object, plus `url`: the run's page, once the worker started it."""

    type: Literal["wandb"]
    wandb: Wandb
    url: str | None


class Mlflow(ApiObject):
    experiment: str
    run_name: str | None


class MlflowIntegration(ApiObject):
    type: Literal["mlflow"]
    mlflow: Mlflow
    url: str | None


Integration = Annotated[WandbIntegration | MlflowIntegration, Field(discriminator="type")]


class FineTuningJob(ApiObject):
    """OpenAI's fine-tuning job, as the openai SDK parses it, plus Lathe's `lora`,
    `quantization`, `max_seq_length`, `training`, `stats`, its GPUs and its preemptions."""

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
    integrations: list[Integration]
    metadata: dict[str, str] | None
    method: Method
    # Lathe's: what a job from a fine-tuned model trains on from (null: from the base), and
    # the models it descends from, oldest first: the base, each ft model, the parent.
    parent: JobParent | None
    lineage: list[str]
    # Lathe's multi-GPU job: its GPUs (of one host), how they share the work (null for one
    # GPU), and which device indexes of its worker it holds while it runs (else null).
    gpus: int
    parallelism: Literal["ddp", "fsdp"] | None
    devices: list[int] | None
    # Times the scheduler paused it to give its GPUs to another team (it resumes from its
    # checkpoint), and the administrator's mark: false, never preempted (nor when its
    # team is marked so: docs/scheduling.md).
    preemptions: int
    preemptible: bool


def job_lineage(job: models.Job) -> list[str]:
    """The job's lineage; a row written without one (before 0007, or a test's) is from
    its base."""
    return list(job.lineage or [job.model])


def _method(job: models.Job) -> dict[str, Any]:
    block = {"hyperparameters": job.hyperparameters}
    if job.method == "dpo":
        return {"type": "dpo", "supervised": None, "dpo": block}
    return {"type": "supervised", "supervised": block, "dpo": None}


def _integrations(job: models.Job) -> list[dict[str, Any]]:
    """As created, each with its run's URL from what the worker reported (stats.tracking)."""
    tracking = (job.stats or {}).get("tracking") or {}
    return [
        {**entry, "url": (tracking.get(entry["type"]) or {}).get("url")}
        for entry in job.integrations or []
    ]


def job_object(job: models.Job, team_id: str) -> FineTuningJob:
    hp = job.hyperparameters
    parent = job.parent
    lineage = job_lineage(job)
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=job.error,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=hp,
        # What the job was created with: the ft model (or checkpoint) trained on, which
        # ends the lineage; else the base.
        model=lineage[-1] if parent else job.model,
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
        integrations=_integrations(job),
        metadata=job.metadata_,
        method=_method(job),
        parent=(
            {k: parent.get(k) for k in ("fine_tuned_model", "job", "checkpoint")}
            if parent
            else None
        ),
        lineage=lineage,
        gpus=job.gpus or 1,
        parallelism=job.parallelism,
        devices=list(job.devices) if job.devices and job.status == JobStatus.RUNNING else None,
        preemptions=job.preemptions or 0,
        preemptible=job.preemptible is not False,
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
    """OpenAI's checkpoint object, and Lathe's `adapter_file`: the step's adapter alone
    (adapter_config.json, adapter_model.safetensors), a fine-tune-results file downloaded
    from /v1/files/{id}/content. Null for a checkpoint written before Lathe kept one, and
    once the team deleted that file."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int
    adapter_file: str | None


def checkpoint_object(ckpt: models.Checkpoint, job_id: str) -> FineTuningJobCheckpoint:
    return FineTuningJobCheckpoint(
        id=ckpt.id,
        created_at=ckpt.created_at,
        fine_tuned_model_checkpoint=ckpt.fine_tuned_model_checkpoint,
        fine_tuning_job_id=job_id,
        metrics=ckpt.metrics,
        step_number=ckpt.step_number,
        adapter_file=ckpt.adapter_file,
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
