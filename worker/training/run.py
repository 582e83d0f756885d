"""One supervised QLoRA training run, top to bottom: data, 4-bit base + LoRA, Trainer,
adapter; `run_training` is every method's entry (DPO: worker.training.dpo).

The Celery task calls `run_training` with plain data (TrainingSpec) and callbacks
(TrainingHooks); nothing here knows about the database, the queue or object storage.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Trainer, TrainingArguments, set_seed

from app.domain.architectures import kind_from_config
from app.domain.classification import report_summary
from app.domain.datasets import DatasetFormat
from app.domain.memory import adapted_matrices
from worker.training.callbacks import HooksCallback
from worker.training.data import (
    TokenizedFile,
    check_parent_classes,
    class_names,
    load_examples,
    load_tokenizer,
    make_collator,
    micro_batch_size,
    typical_length,
)
from worker.training.dpo import run_dpo
from worker.training.levers import (
    model_shape,
    resolve_attention,
    resolve_liger,
    resolve_micro_batch_tokens,
    transformers_globals_kept,
)
from worker.training.qlora_model import (
    add_lora,
    check_model_trains_format,
    encoder_input_limit,
    read_model_config,
    resolve_device,
)
from worker.training.run_stats import (
    ClassificationMetrics,
    mean_token_accuracy,
    predicted_ids,
)
from worker.training.spec import DPO, SUPERVISED, TrainingHooks, TrainingResult, TrainingSpec
from worker.training.trainer_setup import (
    Reporter,
    load_base,
    report_parameters,
    report_sample,
    report_tokens,
    sample_here,
    save_adapter,
    train_and_measure,
    trainer_arguments,
)


def run_training(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    """Train as spec.method says: supervised here, dpo in worker.training.dpo."""
    if spec.method == DPO:
        return run_dpo(spec, hooks)
    if spec.method != SUPERVISED:
        raise ValueError(f"unknown training method {spec.method!r}")
    with transformers_globals_kept():  # Liger's module-wide patches end with the run
        return run_supervised(spec, hooks)


def run_supervised(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    device = resolve_device(spec.device)
    options = spec.options
    classification = spec.data_format == DatasetFormat.CLASSIFICATION
    packing = options.packing and not classification
    set_seed(spec.seed)  # before LoRA init, so a rerun starts from the same adapter weights
    report = Reporter(hooks)

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
    if classes is not None and spec.parent_adapter is not None:
        check_parent_classes(spec.parent_adapter, classes)

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
    report_tokens(report, train, valid, max_seq_length, **({"classes": classes} if classes else {}))

    # 2. Model: frozen 4-bit base, trainable LoRA adapters; the GPU levers resolved.
    attention = resolve_attention(options.attention, device, packed=packing)
    liger = resolve_liger(
        options.liger, device, model_config.get("model_type"), causal_lm=not classification
    )
    base = load_base(spec, device, hooks, classes, attention=attention, liger=liger)
    if classes is not None:
        # A decoder's head reads each row's last token, found by the pad token.
        base.model.config.pad_token_id = tokenizer.pad_token_id
    if spec.parent_adapter is not None:
        hooks.on_message("Continuing the parent model's adapter")
    model = add_lora(
        base.model,
        spec.lora,
        classification=classification,
        modules_to_save=base.new_modules,
        parent=spec.parent_adapter,
    )
    report_parameters(model, report)

    # 3. Train, or go on training from a checkpoint of an earlier run.
    validating = valid is not None
    # A batch is trained as micro-batches of at most micro_batch_tokens tokens with gradient
    # accumulation: the same optimizer steps and loss (the Trainer normalises over the whole
    # accumulated batch's trained tokens), bounded activation memory. "auto": a packed one
    # holds about max_seq_length tokens (SDPA's block-diagonal mask is quadratic in a packed
    # row's length), a padded batch is trained whole; on a GPU, no more than the memory
    # estimate fits.
    checkpointing = options.gradient_checkpointing
    budget = resolve_micro_batch_tokens(
        options.micro_batch_tokens,
        device,
        max_seq_length=max_seq_length,
        batch_size=spec.rank_batch_size,
        packed=packing,
        shape=model_shape(model_config),
        lora_r=spec.lora.r,
        target_modules=adapted_matrices(
            list(spec.lora.target_modules), kind_from_config(model_config)
        ),
        double_quant=spec.quant.double_quant,
        gradient_checkpointing=device == "cuda" if checkpointing is None else checkpointing,
        classification=classification,
        attention=attention,
        fused_loss=liger,
    )
    # With several ranks (spec.world_size) each trains its share of the batch so.
    micro = (
        spec.rank_batch_size
        if budget is None
        else micro_batch_size(spec.rank_batch_size, typical_length(train.examples), budget)
    )
    args = TrainingArguments(
        **trainer_arguments(
            spec,
            device,
            examples=len(train.examples),
            micro_batch=micro,
            validating=validating,
            # Without packing, batches of similar lengths waste the least on padding.
            sampling="random" if packing else "group_by_length",
            # A packed batch has no padding at all (and no attention mask to count it by).
            count_tokens="all" if packing else "non_padding",
            model=model,
        )
    )
    callback = HooksCallback(
        hooks, validating, spec.checkpoint_steps, spec.checkpoint_seconds, classes=classes
    )
    class_metrics = ClassificationMetrics(classes) if classes is not None else None
    compute_metrics = class_metrics or mean_token_accuracy
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=make_collator(
            tokenizer,
            packing=packing,
            classification=classification,
            flash=attention == "flash_attention_2",
        ),
        train_dataset=train.examples,
        eval_dataset=valid.examples if valid is not None else None,
        processing_class=tokenizer,
        callbacks=[callback],
        compute_metrics=compute_metrics if validating else None,
        preprocess_logits_for_metrics=predicted_ids if validating else None,
    )
    levers = {
        "attention": attention,
        "liger": liger,
        "micro_batch_tokens": budget,
        "micro_batch": micro,
        "gradient_accumulation_steps": spec.rank_batch_size // micro,
    }
    train_and_measure(trainer, callback, spec, device, report, levers)
    stopped = callback.stop_reason is not None
    final_report = None
    if class_metrics is not None and class_metrics.last_report is not None and not stopped:
        # The run's last step is an epoch end, always evaluated: this is the final model's.
        rows = reversed(callback.rows)
        step = next((r["step"] for r in rows if "valid_accuracy" in r), trainer.state.global_step)
        final_report = {**class_metrics.last_report, "step": step}
        report("classification", report_summary(final_report), final_report)

    # 4. Save the adapter: adapter_config.json + adapter_model.safetensors.
    # With several ranks, rank 0 writes it (gathered first under FSDP).
    adapter_dir = spec.output_dir / "adapter"
    if save_adapter(trainer, model, adapter_dir):
        if classes is not None:  # which output is which class, for whoever loads the adapter
            (adapter_dir / "classes.json").write_text(json.dumps(classes))
        if final_report is not None:
            (adapter_dir / "classification_report.json").write_text(json.dumps(final_report))
        hooks.on_message("Saved the adapter")

    # 5. Show a person what changed: the trained model answers a held-out prompt (rank 0's
    # whole model; a sharded one cannot generate alone).
    if spec.data_format == DatasetFormat.CHAT and not stopped and sample_here(trainer):
        report_sample(model, tokenizer, spec, report)
    return TrainingResult(
        adapter_dir=adapter_dir,
        trained_tokens=int(trainer.state.num_input_tokens_seen),
        metrics=callback.rows,
        stopped=stopped,
        step=trainer.state.global_step,
        reports=report.reports,
    )
