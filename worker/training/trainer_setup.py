"""What every training method's Trainer shares: its arguments (steps, evaluation,
checkpoints, precision, optimizer), a timed train() measuring throughput, and the reports."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, PrinterCallback, Trainer

from worker.training.callbacks import HooksCallback
from worker.training.distributed import barrier, ddp_backend, is_main_rank
from worker.training.levers import apply_liger, resolve_attention
from worker.training.qlora_model import (
    QuantizedBase,
    decoder_layer_classes,
    load_base_for_training,
    parameter_counts,
    resolve_compute_dtype,
    resolve_optimizer,
)
from worker.training.run_stats import (
    generation_sample,
    throughput,
    throughput_summary,
    token_summary,
)
from worker.training.spec import FSDP, TrainingHooks, TrainingSpec


class Reporter:
    """Passes each report to the hooks and keeps the figures by kind (TrainingResult.reports)."""

    def __init__(self, hooks: TrainingHooks) -> None:
        self.hooks = hooks
        self.reports: dict[str, dict] = {}

    def __call__(self, kind: str, message: str, data: dict) -> None:
        self.reports[kind] = data
        self.hooks.on_report(kind, message, data)


def trainer_arguments(
    spec: TrainingSpec,
    device: str,
    *,
    examples: int,
    micro_batch: int,
    validating: bool,
    sampling: str,
    count_tokens: str,
    model: PeftModel | None = None,
) -> dict:
    """TrainingArguments' keywords for this run (TRL's configs take them too).

    A batch of spec.batch_size examples is trained as micro-batches of `micro_batch` with
    gradient accumulation: the same optimizer steps and loss, bounded activation memory.
    With several ranks each trains its share of the batch (spec.rank_batch_size) so.
    """
    compute_dtype = resolve_compute_dtype(spec.quant.compute_dtype, device)
    total_steps = math.ceil(examples / spec.batch_size) * spec.n_epochs
    return dict(
        output_dir=str(spec.output_dir / "trainer"),
        num_train_epochs=spec.n_epochs,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=spec.rank_batch_size // micro_batch,
        per_device_eval_batch_size=micro_batch,
        learning_rate=spec.learning_rate,
        seed=spec.seed,
        logging_strategy="steps",
        logging_steps=spec.logging_steps,
        # Every eval_steps, at each checkpoint and (an epoch end is one) at the end.
        eval_strategy="steps" if validating else "no",
        eval_steps=(spec.options.eval_steps or max(1, math.ceil(total_steps / 10)))
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
        optim=resolve_optimizer(spec.options.optimizer, device, sharded=is_sharded(spec)),
        bf16=device == "cuda" and compute_dtype == torch.bfloat16,
        fp16=device == "cuda" and compute_dtype == torch.float16,
        train_sampling_strategy=sampling,
        include_num_input_tokens_seen=count_tokens,
        **distributed_arguments(spec, device, model),
    )


def is_sharded(spec: TrainingSpec) -> bool:
    """FSDP across several ranks: the 4-bit weights are stored for sharding."""
    return spec.world_size > 1 and spec.parallelism == FSDP


def distributed_arguments(spec: TrainingSpec, device: str, model: PeftModel | None) -> dict:
    """The Trainer's own data parallelism, for a run of several ranks (none for one).

    DDP: a whole model per rank, the adapters' gradients averaged. The loss of a step is
    normalised over the tokens of the whole global batch (average_tokens_across_devices
    sums them over the ranks), so it equals a single process's on the same batch.

    FSDP (QLoRA on models too large for one device): the decoder layers are wrapped and
    sharded, their 4-bit weights too, which FSDP can flatten because they are stored in the
    compute dtype (load_base_for_training's quant_storage); the Trainer adds peft's policy
    that wraps the trainable LoRA layers apart, and sets FSDP's mixed precision to the
    storage dtype. FSDP1 with use_orig_params: frozen and trainable parameters share the
    wrapped layers. Full state dicts: every checkpoint (and the final adapter) holds the whole
    adapter, gathered on rank 0, as a single process's does. Only on GPUs: accelerate turns
    FSDP on for accelerator devices alone (on the CPU its distributed type is MULTI_CPU and
    an FSDP config is ignored), so CPU ranks run DDP, as they would anyway.
    """
    if spec.world_size <= 1:
        return {}
    arguments = dict(
        ddp_backend=ddp_backend(device),
        ddp_find_unused_parameters=False,  # every LoRA weight has a gradient each step
        average_tokens_across_devices=True,
    )
    if spec.parallelism == FSDP and device == "cuda":
        wrap = decoder_layer_classes(model) if model is not None else []
        arguments.update(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "version": 1,
                "transformer_layer_cls_to_wrap": wrap or None,
                "use_orig_params": True,
                "sync_module_states": True,
                # Each rank quantizes the base while loading it onto its own device
                # (device_map), so the host's RAM never holds more than a shard at a time;
                # loading on rank 0 alone and broadcasting is for unquantized models.
                "cpu_ram_efficient_loading": False,
                "state_dict_type": "FULL_STATE_DICT",
            },
        )
    return arguments


def save_adapter(
    trainer: Trainer,
    model: PeftModel,
    adapter_dir: Path,
    selected_adapters: list[str] | None = None,
) -> bool:
    """Save the trained adapter (adapter_config.json + adapter_model.safetensors); True in
    the process that wrote it. A single process, and rank 0 of a DDP run (every rank holds
    the same adapter), save it as it is; with FSDP every rank takes part in gathering the
    sharded adapter and rank 0 writes it. The other ranks wait until it is written."""
    extra = {"selected_adapters": selected_adapters} if selected_adapters else {}
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective
        if is_main_rank():
            model.save_pretrained(adapter_dir, state_dict=state_dict, **extra)
    elif is_main_rank():
        model.save_pretrained(adapter_dir, **extra)
    barrier()
    return is_main_rank()


def train_and_measure(
    trainer: Trainer,
    callback: HooksCallback,
    spec: TrainingSpec,
    device: str,
    report: Reporter,
    levers: dict | None = None,
) -> None:
    """Train (from spec.resume_from when set) and report this run's throughput, with the
    levers it ran with (attention, liger, micro-batch sizing) beside the figures."""
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
    stats = {**throughput(tokens, seconds, device), **(levers or {})}
    report("throughput", throughput_summary(stats), stats)


def sample_here(trainer: Trainer) -> bool:
    """Whether this process generates the run's sample: a single process, or rank 0 of a
    DDP run (a whole model); under FSDP no rank holds the whole model, so no sample."""
    return is_main_rank() and not trainer.is_fsdp_enabled


def report_tokens(report: Reporter, train, valid, max_length: int, **extra) -> None:
    """What each file costs in tokens and what was cut, before the first step (supervised
    files and preference pairs alike: both carry TokenCounts)."""
    counts = {"train": train.counts.as_dict()}
    if valid is not None:
        counts["valid"] = valid.counts.as_dict()
    report("tokens", token_summary(train, valid, max_length), {**counts, **extra})


def load_base(
    spec: TrainingSpec,
    device: str,
    hooks: TrainingHooks,
    classes: list[str] | None = None,
    *,
    attention: str | None = None,
    liger: bool = False,
) -> QuantizedBase:
    """The frozen 4-bit base with the job's attention and checkpointing options, and
    Liger's kernels when `liger` (resolved by the caller: worker.training.levers).
    `attention` is the resolved implementation; None: the option's, packed rows unknown."""
    if attention is None:
        attention = resolve_attention(spec.options.attention, device, packed=False)
    hooks.on_message(f"Loading base model in 4-bit on {device} ({attention} attention)")
    base = load_base_for_training(
        spec.base_model_path,
        spec.quant,
        device,
        attention=attention,
        gradient_checkpointing=spec.options.gradient_checkpointing,
        classes=classes,
        on_message=hooks.on_message,
        sharded=is_sharded(spec),
    )
    if liger:
        apply_liger(base.model)
        hooks.on_message("Liger kernels on: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE")
    return base


def report_parameters(model: PeftModel, report: Reporter) -> None:
    params = parameter_counts(model)
    share = 100 * params["trainable_parameters"] / max(params["total_parameters"], 1)
    report(
        "model",
        f"Training {params['trainable_parameters']:,} of {params['total_parameters']:,} "
        f"parameters ({share:.2f}%)",
        params,
    )


def report_sample(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, spec: TrainingSpec, report: Reporter
) -> None:
    """Show a person what changed: the trained model's answer to the first held-out prompt
    (else the first training prompt), beside the answer the data wants."""
    max_new_tokens = spec.options.sample_max_new_tokens
    if not max_new_tokens:
        return
    try:
        sample = generation_sample(
            model, tokenizer, spec.valid_file or spec.train_file, max_new_tokens
        )
    except Exception as exc:  # a nicety: never worth failing a trained job over
        report.hooks.on_message(f"No generation sample: {type(exc).__name__}: {exc}"[:500])
    else:
        sample["source"] = "validation" if spec.valid_file else "training"
        report("sample", f"Sample completion: {sample['completion'][:200]!r}", sample)
