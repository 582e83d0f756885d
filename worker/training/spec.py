"""What one training run needs and what it reports back: plain data, no torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class QuantSpec:
    type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto | bfloat16 | float16 | float32


@dataclass(frozen=True)
class TrainingSpec:
    base_model_path: Path
    chat_template: str | None
    data_format: str  # "chat" | "prompt_completion" | "text"
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
    device: str = "auto"  # auto | cpu | cuda
    logging_steps: int = 1
    # A checkpoint at every epoch end, and also every this many steps when set.
    checkpoint_steps: int | None = None
    checkpoint_seconds: float | None = None  # also checkpoint when this long since the last
    # A checkpoint directory an earlier run handed to on_checkpoint (extracted from its
    # tarball): training continues from it (adapter, optimizer, scheduler, RNG, data
    # position, step count) instead of from step 0. The rest of the spec must match that run.
    resume_from: Path | None = None


@dataclass
class TrainingHooks:
    """Callbacks the training loop calls; the Celery task wires them to the database."""

    # Called after each logged step with {"step", "train_loss", "valid_loss"?, "learning_rate",
    # "epoch", "total_steps"}.
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


@dataclass
class TrainingResult:
    adapter_dir: Path  # adapter_config.json + adapter_model.safetensors
    trained_tokens: int  # non-pad input tokens seen, all epochs, steps before a resume included
    metrics: list[dict]  # every row passed to on_metrics in this run, in order
    stopped: bool  # True when should_stop ended training early
    step: int  # the global step training ended at (counting the steps before a resume)
