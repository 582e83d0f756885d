"""One DPO run (Direct Preference Optimization) on the 4-bit base with LoRA, with TRL's
DPOTrainer: preference pairs, the policy and its reference, the Trainer, the adapter.

The policy is the supervised path's model: the frozen 4-bit base with a LoRA adapter, fresh
or the parent's (TrainingSpec.parent_adapter). The reference is never a second copy of the
base. TRL (1.16) takes a PeftModel with `ref_model=None` and copies its adapter "default" to
a frozen adapter "ref" on the same base, computing reference log-probabilities with "ref"
active, or with every adapter switched off when there is no "ref":

- from a parent adapter, "ref" is the parent, frozen: the policy starts equal to its
  reference, so the first step's loss is log 2 and its rewards 0;
- from a fresh adapter, "ref" is deleted: the reference is the base with the adapter off
  (peft's disable_adapter), which is what a fresh adapter (B = 0) starts equal to, without
  a second adapter's forward.

Padding: TRL's DataCollatorForPreference pads on the right, whatever the tokenizer's
padding side: each sequence keeps positions 0..n-1 and the attention mask hides the pads,
so a pair's log-probabilities do not depend on what it is batched with
(tests/worker/test_dpo.py checks this).

Packing: not used. TRL 1.16's `padding_free` for DPO is "temporarily unavailable since the
DPO refactor": set, it warns and pads anyway (DPOConfig's help text, DPOTrainer.__init__).
Instead, as the packed supervised path does, a batch is trained as micro-batches of about
max_seq_length tokens (chosen and rejected sequences together) with gradient accumulation.

Dropout is off, as TRL sets by default (`disable_dropout`): with it the policy's and the
reference's log-probabilities would differ by noise alone, and the rewards with them.
"""

from __future__ import annotations

from datasets import Dataset
from peft import PeftModel
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from app.domain.datasets import DatasetFormat
from worker.training.callbacks import HooksCallback
from worker.training.data import load_tokenizer, micro_batch_size
from worker.training.preference import load_preferences, typical_pair_length
from worker.training.qlora_model import (
    add_lora,
    check_model_trains_format,
    read_model_config,
    resolve_device,
)
from worker.training.spec import TrainingDataError, TrainingHooks, TrainingResult, TrainingSpec
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

# The name TRL gives the frozen copy of the policy's adapter it computes the reference with.
REFERENCE_ADAPTER = "ref"


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer on pairs tokenized and cut by worker.training.preference."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Already prompt_ids / chosen_ids / rejected_ids, within max_length (the collator's
        # own cut is then a no-op); DPOTrainer would render and tokenize them again.
        return dataset


def run_dpo(spec: TrainingSpec, hooks: TrainingHooks) -> TrainingResult:
    device = resolve_device(spec.device)
    options = spec.options
    set_seed(spec.seed)  # before LoRA init, so a rerun starts from the same adapter weights
    report = Reporter(hooks)

    # 1. Data: the pairs' tokens, and what one epoch costs.
    check_model_trains_format(read_model_config(spec.base_model_path), spec.data_format)
    if spec.data_format != DatasetFormat.PREFERENCE:
        raise TrainingDataError(
            "unsupported_format_for_method",
            f"DPO trains on preference pairs; this job's training file is in the "
            f"{spec.data_format!r} format",
        )
    hooks.on_message("Tokenizing the preference pairs")
    tokenizer = load_tokenizer(spec.base_model_path, spec.chat_template)
    max_length = spec.max_seq_length
    train = load_preferences(spec.train_file, tokenizer, max_length, truncation=options.truncation)
    valid = (
        load_preferences(spec.valid_file, tokenizer, max_length, truncation=options.truncation)
        if spec.valid_file is not None
        else None
    )
    report_tokens(report, train, valid, max_length)

    # 2. Model: frozen 4-bit base, the policy's LoRA adapter (the reference: see above).
    base = load_base(spec, device, hooks)
    from_parent = spec.parent_adapter is not None
    if from_parent:
        hooks.on_message("Starting from the parent model's adapter, which is also the reference")
    policy = add_lora(base.model, spec.lora, parent=spec.parent_adapter)
    report_parameters(policy, report)

    # 3. Train, or go on training from a checkpoint of an earlier run.
    validating = valid is not None
    # A micro-batch of m pairs is 2m sequences (chosen, then rejected) padded to the longest:
    # m is sized so that they hold about max_seq_length tokens, the packed supervised
    # path's budget, so a DPO step needs about the activation memory of an SFT step.
    # An explicit training.micro_batch_tokens replaces that budget ("auto" keeps it).
    budget = spec.options.micro_batch_tokens
    budget = max_length if budget == "auto" else int(budget)
    micro = micro_batch_size(spec.rank_batch_size, 2 * typical_pair_length(train.examples), budget)
    args = DPOConfig(
        **trainer_arguments(
            spec,
            device,
            examples=len(train.examples),
            micro_batch=micro,
            validating=validating,
            sampling="random",
            count_tokens="non_padding",  # both sequences of a pair, prompt included
            model=policy,
        ),
        beta=spec.beta,
        loss_type=["sigmoid"],  # the DPO paper's loss
        max_length=max_length,
        truncation_mode="keep_start",
        padding_free=False,  # unavailable in TRL 1.16's DPO (see above)
        precompute_ref_log_probs=False,  # the reference forward is cheap: no second model
        disable_dropout=True,
        # The base is prepared for (or without) gradient checkpointing already
        # (load_base_for_training); DPOConfig would turn it on, on the CPU too.
        gradient_checkpointing=False,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # Evaluation wants the loss and TRL's reward metrics only; without this TRL runs a
        # second forward per batch to hand logits nobody reads to compute_metrics.
        prediction_loss_only=True,
    )
    callback = HooksCallback(hooks, validating, spec.checkpoint_steps, spec.checkpoint_seconds)
    trainer = preference_trainer(
        policy,
        args,
        Dataset.from_list(train.examples),
        Dataset.from_list(valid.examples) if valid is not None else None,
        tokenizer,
        callback,
        reference_is_parent=from_parent,
    )
    train_and_measure(trainer, callback, spec, device, report)
    stopped = callback.stop_reason is not None

    # 4. Save the policy's adapter alone (not the reference): adapter_config.json +
    # adapter_model.safetensors, a full adapter on the base, as a supervised job's.
    adapter_dir = spec.output_dir / "adapter"
    if save_adapter(trainer, policy, adapter_dir, selected_adapters=["default"]):
        hooks.on_message("Saved the adapter")

    # 5. Show a person what changed: the trained model answers a held-out prompt.
    if not stopped and sample_here(trainer):
        report_sample(policy, tokenizer, spec, report)
    return TrainingResult(
        adapter_dir=adapter_dir,
        trained_tokens=int(trainer.state.num_input_tokens_seen),
        metrics=callback.rows,
        stopped=stopped,
        step=trainer.state.global_step,
        reports=report.reports,
    )


def preference_trainer(
    policy: PeftModel,
    args: DPOConfig,
    train: Dataset,
    valid: Dataset | None,
    tokenizer,
    callback: HooksCallback,
    *,
    reference_is_parent: bool,
) -> PreferenceTrainer:
    """The DPOTrainer for `policy`, its reference set up as the module docstring says."""
    # TRL casts a 4-bit model's trainable weights to bfloat16 (QLoRA's recipe). Lathe keeps
    # adapters in float32, as the supervised path does (on a GPU the Trainer's autocast does
    # the half-precision math), so they are put back, exactly: the policy then starts equal
    # to its reference, the float32 copy TRL made before casting.
    trainable = {
        name: param.detach().clone()
        for name, param in policy.named_parameters()
        if param.requires_grad
    }
    trainer = PreferenceTrainer(
        model=policy,
        ref_model=None,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    for name, param in policy.named_parameters():
        if name in trainable:
            param.data = trainable[name]
    if not reference_is_parent:
        policy.delete_adapter(REFERENCE_ADAPTER)
    return trainer
