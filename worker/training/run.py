"""One QLoRA training run, top to bottom: data, 4-bit base + LoRA, Trainer, adapter.

The Celery task calls `run_training` with plain data (TrainingSpec) and callbacks
(TrainingHooks); nothing here knows about the database, the queue or object storage.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from worker.training.data import load_examples, load_tokenizer, make_collator
from worker.training.model import (
    add_lora,
    load_quantized_base,
    resolve_compute_dtype,
    resolve_device,
)
from worker.training.spec import TrainingHooks, TrainingResult, TrainingSpec


class HooksCallback(TrainerCallback):
    """Turns the Trainer's events into the job's metrics, cancel checks and checkpoints."""

    def __init__(self, hooks: TrainingHooks, checkpoints_dir: Path, validating: bool) -> None:
        self.hooks = hooks
        self.checkpoints_dir = checkpoints_dir
        self.validating = validating
        self.rows: list[dict] = []
        self.pending: dict | None = None  # a step's train row, waiting for its eval loss
        self.stopped = False

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.hooks.on_message(f"Training for {state.max_steps} steps")

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if self.hooks.should_stop():
            self.stopped = True
            control.should_training_stop = True
            control.should_evaluate = False  # stop now, not after a pass over the valid set
        elif state.epoch is not None and float(state.epoch).is_integer():
            # Every epoch ends on a logged (and evaluated) step, so each checkpoint carries
            # the losses of the exact point it was taken at.
            control.should_log = True
            control.should_evaluate = self.validating
        return control

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            row = {
                "step": state.global_step,
                "train_loss": float(logs["loss"]),
                "learning_rate": float(logs["learning_rate"]),
                "epoch": float(state.epoch or 0.0),
                "total_steps": state.max_steps,
            }
            if control.should_evaluate:
                self.pending = row  # the Trainer evaluates right after logging this step
            else:
                self.emit(row)
        elif "eval_loss" in logs:
            row = self.pending or {
                "step": state.global_step,
                "epoch": float(state.epoch or 0.0),
                "total_steps": state.max_steps,
            }
            self.pending = None
            self.emit({**row, "valid_loss": float(logs["eval_loss"])})

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        self.hooks.on_metrics(row)

    def on_epoch_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if self.stopped:
            return  # cut short mid-epoch: not an epoch's worth of training
        adapter_dir = self.checkpoints_dir / f"step-{state.global_step}"
        kwargs["model"].save_pretrained(adapter_dir)
        self.hooks.on_checkpoint(state.global_step, adapter_dir, self.rows[-1] if self.rows else {})


def run_training(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    device = resolve_device(spec.device)
    set_seed(spec.seed)  # before LoRA init, so a rerun starts from the same adapter weights

    # 1. Data: tokens and loss masks.
    hooks.on_message("Tokenizing the dataset")
    tokenizer = load_tokenizer(spec.base_model_path, spec.chat_template)
    train_examples = load_examples(
        spec.train_file, spec.data_format, tokenizer, spec.max_seq_length
    )
    valid_examples = (
        load_examples(spec.valid_file, spec.data_format, tokenizer, spec.max_seq_length)
        if spec.valid_file is not None
        else None
    )

    # 2. Model: frozen 4-bit base, trainable LoRA adapters.
    hooks.on_message(f"Loading base model in 4-bit on {device}")
    model = add_lora(load_quantized_base(spec.base_model_path, spec.quant, device), spec.lora)

    # 3. Train. Checkpoints are ours (adapter only, at epoch ends), not the Trainer's.
    compute_dtype = resolve_compute_dtype(spec.quant.compute_dtype, device)
    validating = valid_examples is not None
    args = TrainingArguments(
        output_dir=str(spec.output_dir / "trainer"),
        num_train_epochs=spec.n_epochs,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        logging_strategy="steps",
        logging_steps=spec.logging_steps,
        eval_strategy="steps" if validating else "no",
        eval_steps=spec.logging_steps if validating else None,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        # Paged optimizer states spill to host memory on spikes instead of failing; the
        # paging is CUDA unified memory, so the CPU gets the plain optimizer.
        optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
        bf16=device == "cuda" and compute_dtype == torch.bfloat16,
        fp16=device == "cuda" and compute_dtype == torch.float16,
        include_num_input_tokens_seen="non_padding",
    )
    callback = HooksCallback(hooks, spec.output_dir / "checkpoints", validating)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=make_collator(tokenizer),
        train_dataset=train_examples,
        eval_dataset=valid_examples,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # With tqdm off the Trainer prints every log dict instead; the hooks are our log.
    trainer.remove_callback(PrinterCallback)
    trainer.train()

    # 4. Save the adapter: adapter_config.json + adapter_model.safetensors.
    adapter_dir = spec.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    hooks.on_message("Saved the adapter")
    return TrainingResult(
        adapter_dir=adapter_dir,
        trained_tokens=int(trainer.state.num_input_tokens_seen),
        metrics=callback.rows,
        stopped=callback.stopped,
    )
