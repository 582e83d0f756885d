"""One QLoRA training run, top to bottom: data, 4-bit base + LoRA, Trainer, adapter.

The Celery task calls `run_training` with plain data (TrainingSpec) and callbacks
(TrainingHooks); nothing here knows about the database, the queue or object storage.
"""

from __future__ import annotations

import time
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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from worker.training.data import load_examples, load_tokenizer, make_collator
from worker.training.model import (
    add_lora,
    load_quantized_base,
    resolve_compute_dtype,
    resolve_device,
)
from worker.training.spec import TrainingHooks, TrainingResult, TrainingSpec


class HooksCallback(TrainerCallback):
    """Turns the Trainer's events into the job's metrics, stops and checkpoints.

    Which steps are checkpointed is decided here (epoch ends, every `checkpoint_steps`, a
    pause); the saving is the Trainer's own (`control.should_save`: adapter, optimizer,
    scheduler, RNG and trainer state), and `on_save` hands the directory to the hooks.
    """

    def __init__(
        self,
        hooks: TrainingHooks,
        validating: bool,
        checkpoint_steps: int | None,
        checkpoint_seconds: float | None = None,
    ) -> None:
        self.hooks = hooks
        self.validating = validating
        self.checkpoint_steps = checkpoint_steps
        # Also checkpoint when this much time has passed since the last one, so a long
        # epoch never risks more than that much work to a crash.
        self.checkpoint_seconds = checkpoint_seconds
        self.last_checkpoint = time.monotonic()
        self.rows: list[dict] = []
        self.pending: dict | None = None  # a step's train row, waiting for its eval loss
        self.stop_reason: str | None = None  # "pause" | "cancel" once should_stop said so

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        message = f"Training for {state.max_steps} steps"
        if state.global_step:  # resumed: the Trainer restored the step count
            message += f", continuing after step {state.global_step}"
        self.hooks.on_message(message)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        reason = self.hooks.should_stop()
        if reason == "pause":
            # Keep what was trained: this step is checkpointed like an epoch end, evaluation
            # included. An uninterrupted run evaluates here too (eval_steps is
            # logging_steps), and each evaluation draws from the torch RNG (its DataLoader's
            # seed) before the RNG state is saved: skipping it would shift every dropout
            # mask after the resume.
            self.stop_reason = "pause"
            control.should_training_stop = True
            self.checkpoint_here(control)
        elif reason:
            self.stop_reason = "cancel"
            control.should_training_stop = True
            control.should_evaluate = False  # stop now, not after a pass over the valid set
            control.should_save = False  # not even a save_steps checkpoint on this step
        elif self.checkpoint_due(state):
            self.checkpoint_here(control)
        return control

    def checkpoint_due(self, state: TrainerState) -> bool:
        if state.epoch is not None and float(state.epoch).is_integer():
            return True  # the last step of an epoch
        every = self.checkpoint_steps
        if every is not None and state.global_step % every == 0:
            return True
        interval = self.checkpoint_seconds
        return interval is not None and time.monotonic() - self.last_checkpoint >= interval

    def checkpoint_here(self, control: TrainerControl) -> None:
        # Every checkpoint is taken on a logged (and evaluated) step, so it carries the
        # losses of the exact point it was taken at.
        control.should_log = True
        control.should_evaluate = self.validating
        control.should_save = True

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

    def on_save(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        self.last_checkpoint = time.monotonic()
        # Called right after Trainer._save_checkpoint wrote this directory (logging and
        # evaluation of the step come before the save, so its row is complete).
        step = state.global_step
        checkpoint_dir = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        row = next((r for r in reversed(self.rows) if r["step"] == step), {})
        self.hooks.on_checkpoint(step, checkpoint_dir, row)


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

    # 3. Train, or go on training from a checkpoint of an earlier run.
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
        # The Trainer's own checkpoints, every checkpoint_steps; HooksCallback adds the epoch
        # ends and a pause. Each is uploaded by on_checkpoint as soon as it is written, so
        # one local copy is enough: older ones are deleted.
        save_strategy="steps" if spec.checkpoint_steps else "no",
        save_steps=spec.checkpoint_steps,
        save_total_limit=1,
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
    callback = HooksCallback(hooks, validating, spec.checkpoint_steps, spec.checkpoint_seconds)
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
    # Resuming loads the adapter weights into the LoRA model (PeftModel.load_adapter), the
    # optimizer, scheduler and RNG states, and trainer_state.json: the step count, the tokens
    # seen, and the data position (the batches already trained in the epoch are skipped).
    resume_from = str(spec.resume_from) if spec.resume_from is not None else None
    trainer.train(resume_from_checkpoint=resume_from)

    # 4. Save the adapter: adapter_config.json + adapter_model.safetensors.
    adapter_dir = spec.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    hooks.on_message("Saved the adapter")
    return TrainingResult(
        adapter_dir=adapter_dir,
        trained_tokens=int(trainer.state.num_input_tokens_seen),
        metrics=callback.rows,
        stopped=callback.stop_reason is not None,
        step=trainer.state.global_step,
    )
