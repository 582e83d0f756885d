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


@dataclass
class TrainingHooks:
    """Callbacks the training loop calls; the Celery task wires them to the database."""

    # Called after each logged step with {"step", "train_loss", "valid_loss"?, "learning_rate",
    # "epoch", "total_steps"}.
    on_metrics: Callable[[dict], None] = lambda row: None
    # Polled every step; True stops training at once (cooperative cancel).
    should_stop: Callable[[], bool] = lambda: False
    # Called at each epoch end with (step, adapter_dir, metrics) where adapter_dir holds
    # adapter_config.json + adapter_model.safetensors for that point.
    on_checkpoint: Callable[[int, Path, dict], None] = lambda step, path, metrics: None
    # Free-text progress messages ("Loading base model in 4-bit", ...).
    on_message: Callable[[str], None] = lambda message: None


@dataclass
class TrainingResult:
    adapter_dir: Path  # adapter_config.json + adapter_model.safetensors
    trained_tokens: int  # tokens seen in training, all epochs (non-pad input tokens)
    metrics: list[dict]  # every row passed to on_metrics, in order
    stopped: bool  # True when should_stop ended training early
