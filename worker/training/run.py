"""One QLoRA training run, top to bottom: data, 4-bit base + LoRA, Trainer, adapter.

The Celery task calls `run_training` with plain data (TrainingSpec) and callbacks
(TrainingHooks); nothing here knows about the database, the queue or object storage.
"""

from __future__ import annotations

import json
import math
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

from app.domain.classification import report_summary
from app.domain.datasets import DatasetFormat
from worker.training.data import (
    TokenizedFile,
    class_names,
    load_examples,
    load_tokenizer,
    make_collator,
    micro_batch_size,
    typical_length,
)
from worker.training.qlora_model import (
    add_lora,
    check_model_trains_format,
    encoder_input_limit,
    load_base_for_training,
    parameter_counts,
    read_model_config,
    resolve_compute_dtype,
    resolve_device,
    resolve_optimizer,
)
from worker.training.run_stats import (
    ClassificationMetrics,
    generation_sample,
    mean_token_accuracy,
    predicted_ids,
    throughput,
    throughput_summary,
    token_summary,
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
        # After a resume the Trainer has restored the count: this run's share starts here.
        self.tokens_at_begin = state.num_input_tokens_seen
        message = f"Training for {state.max_steps} steps"
        if state.global_step:  # resumed: the Trainer restored the step count
            message += f", continuing after step {state.global_step}"
        self.hooks.on_message(message)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        reason = self.hooks.should_stop()
        if reason == "pause":
            # Keep what was trained: this step is checkpointed. It is evaluated only if an
            # uninterrupted run would evaluate it too (the flow callback already said so):
            # each evaluation draws from the torch RNG (its DataLoader's seed) before the
            # RNG state is saved, so an extra one would shift every dropout mask after
            # the resume, and the resumed run would no longer match an uninterrupted one.
            self.stop_reason = "pause"
            control.should_training_stop = True
            self.checkpoint_here(control, evaluate=control.should_evaluate)
        elif reason:
            self.stop_reason = "cancel"
            control.should_training_stop = True
            control.should_evaluate = False  # stop now, not after a pass over the valid set
            control.should_save = False  # not even a save_steps checkpoint on this step
        elif self.checkpoint_due(state):
            self.checkpoint_here(control, evaluate=self.validating)
        return control

    def checkpoint_due(self, state: TrainerState) -> bool:
        if state.epoch is not None and float(state.epoch).is_integer():
            return True  # the last step of an epoch
        every = self.checkpoint_steps
        if every is not None and state.global_step % every == 0:
            return True
        interval = self.checkpoint_seconds
        return interval is not None and time.monotonic() - self.last_checkpoint >= interval

    def checkpoint_here(self, control: TrainerControl, evaluate: bool) -> None:
        # Every checkpoint is taken on a logged (and, but for a pause, evaluated) step, so
        # it carries the losses of the exact point it was taken at.
        control.should_log = True
        control.should_evaluate = evaluate
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
            row = {**row, "valid_loss": float(logs["eval_loss"])}
            for metric in ("mean_token_accuracy", "accuracy", "macro_f1"):
                if f"eval_{metric}" in logs:
                    row[f"valid_{metric}"] = float(logs[f"eval_{metric}"])
            self.emit(row)

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
    options = spec.options
    classification = spec.data_format == DatasetFormat.CLASSIFICATION
    packing = options.packing and not classification
    set_seed(spec.seed)  # before LoRA init, so a rerun starts from the same adapter weights
    reports: dict[str, dict] = {}

    def report(kind: str, message: str, data: dict) -> None:
        reports[kind] = data
        hooks.on_report(kind, message, data)

    # 1. Data: tokens and loss masks, and what one epoch costs.
    model_config = read_model_config(spec.base_model_path)
    check_model_trains_format(model_config, spec.data_format)
    hooks.on_message("Tokenizing the dataset")
    tokenizer = load_tokenizer(spec.base_model_path, spec.chat_template)
    max_seq_length = spec.max_seq_length
    limit = encoder_input_limit(model_config, tokenizer)
    if limit is not None and limit < max_seq_length:
        max_seq_length = limit
        hooks.on_message(
            f"The base model reads at most {limit} tokens: examples are cut to {limit}, "
            f"not to max_seq_length ({spec.max_seq_length})"
        )
    classes = class_names(spec.train_file) if classification else None

    def tokenized(path: Path) -> TokenizedFile:
        return load_examples(
            path,
            spec.data_format,
            tokenizer,
            max_seq_length,
            train_on_inputs=options.train_on_inputs,
            truncation=options.truncation,
            classes=classes,
        )

    train = tokenized(spec.train_file)
    valid = tokenized(spec.valid_file) if spec.valid_file is not None else None
    counts = {"train": train.counts.as_dict()}
    if valid is not None:
        counts["valid"] = valid.counts.as_dict()
    if classes is not None:
        counts["classes"] = classes
    report("tokens", token_summary(train, valid, max_seq_length), counts)

    # 2. Model: frozen 4-bit base, trainable LoRA adapters.
    hooks.on_message(f"Loading base model in 4-bit on {device}")
    base = load_base_for_training(
        spec.base_model_path,
        spec.quant,
        device,
        attention=options.attention,
        gradient_checkpointing=options.gradient_checkpointing,
        classes=classes,
        on_message=hooks.on_message,
    )
    if classes is not None:
        # A decoder's head reads each row's last token, found by the pad token.
        base.model.config.pad_token_id = tokenizer.pad_token_id
    model = add_lora(
        base.model, spec.lora, classification=classification, modules_to_save=base.new_modules
    )
    params = parameter_counts(model)
    share = 100 * params["trainable_parameters"] / max(params["total_parameters"], 1)
    report(
        "model",
        f"Training {params['trainable_parameters']:,} of {params['total_parameters']:,} "
        f"parameters ({share:.2f}%)",
        params,
    )

    # 3. Train, or go on training from a checkpoint of an earlier run.
    compute_dtype = resolve_compute_dtype(spec.quant.compute_dtype, device)
    validating = valid is not None
    total_steps = math.ceil(len(train.examples) / spec.batch_size) * spec.n_epochs
    # A packed row's attention is quadratic in its length (SDPA builds a block-diagonal mask
    # over the whole row), so a batch is trained as micro-batches of about max_seq_length
    # tokens with gradient accumulation: the same optimizer steps and loss (the Trainer
    # normalises over the whole accumulated batch), bounded activation memory.
    micro = micro_batch_size(spec.batch_size, typical_length(train.examples), max_seq_length)
    if not packing:
        micro = spec.batch_size
    args = TrainingArguments(
        output_dir=str(spec.output_dir / "trainer"),
        num_train_epochs=spec.n_epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=spec.batch_size // micro,
        per_device_eval_batch_size=micro,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        logging_strategy="steps",
        logging_steps=spec.logging_steps,
        # Every eval_steps, at each checkpoint and (an epoch end is one) at the end.
        eval_strategy="steps" if validating else "no",
        eval_steps=(options.eval_steps or max(1, math.ceil(total_steps / 10)))
        if validating
        else None,
        # The Trainer's own checkpoints, every checkpoint_steps; HooksCallback adds the epoch
        # ends and a pause. Each is uploaded by on_checkpoint as soon as it is written, so
        # one local copy is enough: older ones are deleted.
        save_strategy="steps" if spec.checkpoint_steps else "no",
        save_steps=spec.checkpoint_steps,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        optim=resolve_optimizer(options.optimizer, device),
        bf16=device == "cuda" and compute_dtype == torch.bfloat16,
        fp16=device == "cuda" and compute_dtype == torch.float16,
        # Without packing, batches of similar lengths waste the least on padding.
        train_sampling_strategy="random" if packing else "group_by_length",
        # A packed batch has no padding at all (and no attention mask to count it by).
        include_num_input_tokens_seen="all" if packing else "non_padding",
    )
    callback = HooksCallback(hooks, validating, spec.checkpoint_steps, spec.checkpoint_seconds)
    class_metrics = ClassificationMetrics(classes) if classes is not None else None
    compute_metrics = class_metrics or mean_token_accuracy
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=make_collator(
            tokenizer,
            packing=packing,
            classification=classification,
            flash=options.attention == "flash_attention_2",
        ),
        train_dataset=train.examples,
        eval_dataset=valid.examples if valid is not None else None,
        processing_class=tokenizer,
        callbacks=[callback],
        compute_metrics=compute_metrics if validating else None,
        preprocess_logits_for_metrics=predicted_ids if validating else None,
    )
    # With tqdm off the Trainer prints every log dict instead; the hooks are our log.
    trainer.remove_callback(PrinterCallback)
    # Resuming loads the adapter weights into the LoRA model (PeftModel.load_adapter), the
    # optimizer, scheduler and RNG states, and trainer_state.json: the step count, the tokens
    # seen, and the data position (the batches already trained in the epoch are skipped).
    resume_from = str(spec.resume_from) if spec.resume_from is not None else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    tokens = trainer.state.num_input_tokens_seen - callback.tokens_at_begin
    stats = throughput(tokens, seconds, device)
    report("throughput", throughput_summary(stats), stats)
    stopped = callback.stop_reason is not None
    final_report = None
    if class_metrics is not None and class_metrics.last_report is not None and not stopped:
        # The run's last step is an epoch end, always evaluated: this is the final model's.
        rows = reversed(callback.rows)
        step = next((r["step"] for r in rows if "valid_accuracy" in r), trainer.state.global_step)
        final_report = {**class_metrics.last_report, "step": step}
        report("classification", report_summary(final_report), final_report)

    # 4. Save the adapter: adapter_config.json + adapter_model.safetensors.
    adapter_dir = spec.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    if classes is not None:  # which output is which class, for whoever loads the adapter
        (adapter_dir / "classes.json").write_text(json.dumps(classes))
    if final_report is not None:
        (adapter_dir / "classification_report.json").write_text(json.dumps(final_report))
    hooks.on_message("Saved the adapter")

    # 5. Show a person what changed: the trained model answers a held-out prompt.
    if spec.data_format == DatasetFormat.CHAT and options.sample_max_new_tokens and not stopped:
        try:
            sample = generation_sample(
                model, tokenizer, spec.valid_file or spec.train_file, options.sample_max_new_tokens
            )
        except Exception as exc:  # a nicety: never worth failing a trained job over
            hooks.on_message(f"No generation sample: {type(exc).__name__}: {exc}"[:500])
        else:
            sample["source"] = "validation" if spec.valid_file else "training"
            report("sample", f"Sample completion: {sample['completion'][:200]!r}", sample)
    return TrainingResult(
        adapter_dir=adapter_dir,
        trained_tokens=int(trainer.state.num_input_tokens_seen),
        metrics=callback.rows,
        stopped=stopped,
        step=trainer.state.global_step,
        reports=reports,
    )
