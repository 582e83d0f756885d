"""What one training run needs and what it reports back: plain data, no torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.domain.hyperparameters import DEFAULT_BETA

ALL_LINEAR = "all-linear"


class TrainingDataError(ValueError):
    """The data cannot train as the job asks (too long, nothing to learn, unknown label):
    the job fails with `code` and this message, which names the file and lines."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Every linear layer of the transformer blocks (attention and MLP, not the output
    # head), as the QLoRA paper found necessary to match full fine-tuning.
    target_modules: tuple[str, ...] = (ALL_LINEAR,)


@dataclass(frozen=True)
class QuantSpec:
    type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto | bfloat16 | float16 | float32


@dataclass(frozen=True)
class TrainingOptions:
    """How training trades memory, speed and what it learns from; each is a job option."""

    train_on_inputs: bool = False  # loss on prompts and user turns too
    truncation: str = "truncate"  # truncate | refuse: examples past max_seq_length
    packing: bool = True  # padding-free batches (causal LM only)
    gradient_checkpointing: bool | None = None  # None: on a GPU yes, on the CPU no
    optimizer: str = "auto"  # auto: paged_adamw_8bit on a GPU, adamw_torch on the CPU
    # auto: on a GPU with packed rows flash_attention_2 where installed, else flex_attention
    # (no quadratic mask); sdpa otherwise (worker.training.levers.resolve_attention).
    attention: str = "auto"  # auto | sdpa | eager | flash_attention_2 | flex_attention
    # Liger's Triton kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE); auto: on a
    # GPU for the model types Liger covers, never on the CPU.
    liger: bool | str = "auto"
    # Tokens one micro-batch may hold (a batch is trained as micro-batches with gradient
    # accumulation); auto: about max_seq_length packed, a padded batch whole, on a GPU no
    # more than the memory estimate fits (worker.training.levers).
    micro_batch_tokens: int | str = "auto"
    eval_steps: int | None = None  # None: about ten evaluations over the run
    sample_max_new_tokens: int = 64  # generation sample at the end of a chat job; 0: none


SUPERVISED = "supervised"
DPO = "dpo"

# How a run on several GPUs splits the work (worker.training.distributed): "ddp" keeps a
# whole copy of the 4-bit model on each GPU and averages the adapters' gradients; "fsdp"
# shards the model's parameters (4-bit weights included) across the GPUs.
DDP = "ddp"
FSDP = "fsdp"


@dataclass(frozen=True)
class TrainingSpec:
    base_model_path: Path
    chat_template: str | None
    data_format: str  # chat | prompt_completion | text | classification | preference
    train_file: Path  # local JSONL, already validated
    valid_file: Path | None
    output_dir: Path  # scratch space for this run
    n_epochs: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    seed: int
    lora: LoraSpec = field(default_factory=LoraSpec)
    quant: QuantSpec = field(default_factory=QuantSpec)
    options: TrainingOptions = field(default_factory=TrainingOptions)
    device: str = "auto"  # auto | cpu | cuda
    logging_steps: int = 1
    # A checkpoint at every epoch end, and also every this many steps when set.
    checkpoint_steps: int | None = None
    checkpoint_seconds: float | None = None  # also checkpoint when this long since the last
    # A checkpoint directory an earlier run handed to on_checkpoint (extracted from its
    # tarball): training continues from it (adapter, optimizer, scheduler, RNG, data
    # position, step count) instead of from step 0. The rest of the spec must match that run.
    resume_from: Path | None = None
    # supervised: next-token loss on the data; dpo: Direct Preference Optimization on a
    # preference file (worker.training.dpo).
    method: str = SUPERVISED
    # dpo: how far the policy may move from the reference (higher: less far).
    beta: float = DEFAULT_BETA
    # An adapter directory (adapter_config.json + adapter_model.safetensors) of an earlier
    # job on this base: training starts from its weights and LoRA shape instead of a fresh
    # adapter. For dpo it is also the frozen reference; without one the reference is the
    # base alone (the adapter switched off).
    parent_adapter: Path | None = None
    # Training processes (ranks), one per GPU of one host; 1: a single process, no launcher.
    # batch_size is the global batch: each rank trains batch_size // world_size examples
    # a step, so the API only accepts a batch size divisible by the GPU count.
    world_size: int = 1
    parallelism: str = DDP  # ddp | fsdp, with world_size > 1

    @property
    def rank_batch_size(self) -> int:
        """The examples each rank trains per optimizer step."""
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over {self.world_size} GPUs"
            )
        return self.batch_size // self.world_size


# DPO's figures as TRL logs them (rewards/..., eval_rewards/...) -> their name in a metrics
# row, after "train_" or "valid_": how often and by how much the chosen answer out-rewards
# the rejected one, and the two rewards.
REWARD_FIGURES = {
    "rewards/accuracies": "reward_accuracy",
    "rewards/margins": "reward_margin",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
}
REWARD_COLUMNS = tuple(
    f"{side}_{name}" for side in ("train", "valid") for name in REWARD_FIGURES.values()
)
# The figures of a metrics row a checkpoint keeps, and (with the learning rate and epoch)
# metrics.csv's columns, in order; a job's kind leaves the others empty.
STEP_FIGURES = (
    "step",
    "train_loss",
    "valid_loss",
    "valid_mean_token_accuracy",
    "valid_accuracy",
    "valid_macro_f1",
    *REWARD_COLUMNS,
)


@dataclass
class TrainingHooks:
    """Callbacks the training loop calls; the Celery task wires them to the database."""

    # Called after each logged step with {"step", "train_loss", "valid_loss"?, "learning_rate",
    # "epoch", "total_steps"}; a dpo run adds train_/valid_ reward_accuracy, reward_margin,
    # rewards_chosen and rewards_rejected (REWARD_COLUMNS).
    on_metrics: Callable[[dict], None] = lambda row: None
    # Polled after every step: None goes on; "pause" stops at once and checkpoints that step
    # first, so a run resumed from it loses nothing; "cancel" (or any other truthy value)
    # stops at once and saves nothing.
    should_stop: Callable[[], str | None] = lambda: None
    # Called with (step, checkpoint_dir, metrics) at each epoch end, every checkpoint_steps
    # steps and on pause. checkpoint_dir is a Trainer checkpoint, flat: the adapter
    # (adapter_config.json + adapter_model.safetensors, loadable with
    # PeftModel.from_pretrained), optimizer.pt, scheduler.pt, rng_state.pth,
    # trainer_state.json, the tokenizer and training_args.bin. Copy it during the call:
    # the Trainer deletes it once a newer checkpoint is saved. metrics is that step's row.
    on_checkpoint: Callable[[int, Path, dict], None] = lambda step, path, metrics: None
    # Free-text progress messages ("Loading base model in 4-bit", ...).
    on_message: Callable[[str], None] = lambda message: None
    # Figures the job shows, by kind: "tokens" (per file: TokenCounts) before training,
    # "model" (trainable and total parameters) once the adapters are on, "throughput"
    # (tokens/s, peak memory) at the end, "sample" (a generation from a held-out prompt).
    # Called with (kind, a one-line summary, the figures).
    on_report: Callable[[str, str, dict], None] = lambda kind, message, data: None


@dataclass
class TrainingResult:
    adapter_dir: Path  # adapter_config.json + adapter_model.safetensors
    trained_tokens: int  # non-pad input tokens seen, all epochs, steps before a resume included
    metrics: list[dict]  # every row passed to on_metrics in this run, in order
    stopped: bool  # True when should_stop ended training early
    step: int  # the global step training ended at (counting the steps before a resume)
    reports: dict = field(default_factory=dict)  # every on_report's data, by kind
