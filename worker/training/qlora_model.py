"""The model being trained: a frozen base quantized to 4-bit, with LoRA adapters on top."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from worker.training.spec import ALL_LINEAR, LoraSpec, QuantSpec


def resolve_device(device: str) -> str:
    """With "auto", train on the GPU when there is one, else on bitsandbytes' CPU backend."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_compute_dtype(compute_dtype: str, device: str) -> torch.dtype:
    """The dtype 4-bit weights are dequantized to for each matmul.

    On a GPU, bfloat16 where the hardware has it (same range as float32, so no overflow),
    float16 on older cards. On the CPU, float32: half precision there is slow or missing.
    """
    if compute_dtype != "auto":
        return getattr(torch, compute_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_optimizer(optimizer: str, device: str) -> str:
    """With "auto", bitsandbytes' paged 8-bit AdamW on a GPU, as the QLoRA paper trains:
    8-bit states take a quarter of the memory, and paging spills them to host memory on a
    spike instead of failing. Paging is CUDA unified memory, so the CPU gets plain AdamW."""
    if optimizer == "auto":
        return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
    return optimizer


def load_quantized_base(
    model_path: Path,
    quant: QuantSpec,
    device: str,
    *,
    attention: str = "sdpa",
    gradient_checkpointing: bool | None = None,
    classes: list[str] | None = None,
) -> PreTrainedModel:
    """The base model with its linear layers in 4-bit, frozen and ready for adapters.

    With `classes` it is loaded for sequence classification: the transformer with a new
    classification head (one output per class) in place of the language-model head.
    """
    compute_dtype = resolve_compute_dtype(quant.compute_dtype, device)
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    common = dict(
        quantization_config=quantization_config,
        dtype=compute_dtype,  # for what stays unquantized: embeddings, norms, heads
        device_map={"": torch.cuda.current_device() if device == "cuda" else device},
        attn_implementation=attention,
        use_safetensors=True,  # never unpickle a checkpoint
        trust_remote_code=False,
    )
    if classes is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: i for i, name in enumerate(classes)},
            **common,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **common)
    model.config.use_cache = False  # a KV cache only helps generation
    if device == "cpu":
        keep_cpu_weights_trainable(model)
    # Freezes the base, upcasts norms to float32 for stable gradients. Gradient
    # checkpointing trades compute for activation memory: worth it on a GPU, where memory
    # is the limit, not on the CPU, where time is.
    if gradient_checkpointing is None:
        gradient_checkpointing = device == "cuda"
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def keep_cpu_weights_trainable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, a Linear4bit called in eval mode without gradients (the
    Trainer's validation pass) converts its weight, for good, into a packed layout whose
    kernel has no backward. Training steps after the first evaluation then silently lose
    the gradient through every frozen 4-bit layer and run in bfloat16: measured here, the
    same seed's train loss ended 0.3 higher with a validation file than without one.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def add_lora(model: PreTrainedModel, lora: LoraSpec, *, classification: bool = False) -> PeftModel:
    """Wrap the frozen base with trainable low-rank adapters on the target modules.

    For classification (SEQ_CLS) peft also trains and saves the new classification head
    in full, as it must: it starts from random weights.
    """
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # "all-linear": every nn.Linear / Linear4bit except the output head.
        target_modules=ALL_LINEAR if ALL_LINEAR in targets else list(targets),
        bias="none",
        task_type="SEQ_CLS" if classification else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def parameter_counts(model: PeftModel) -> dict:
    """Trainable (adapters, and a classification head) and total parameters.

    A 4-bit weight is stored two to a byte, so its tensor holds half as many elements as
    the layer has weights; peft's count corrects for that.
    """
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_parameters": int(trainable), "total_parameters": int(total)}
