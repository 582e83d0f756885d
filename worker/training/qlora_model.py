"""The model being trained: a frozen base quantized to 4-bit, with LoRA adapters on top."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from app.domain.architectures import ModelKind, kind_from_config
from app.domain.datasets import DatasetFormat
from worker.training.checkpoint_layout import checkpoint_layout, in_modules, new_modules
from worker.training.spec import ALL_LINEAR, LoraSpec, QuantSpec, TrainingDataError


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


def resolve_optimizer(optimizer: str, device: str, sharded: bool = False) -> str:
    """With "auto", bitsandbytes' paged 8-bit AdamW on a GPU, as the QLoRA paper trains:
    8-bit states take a quarter of the memory, and paging spills them to host memory on a
    spike instead of failing. Paging is CUDA unified memory, so the CPU gets plain AdamW,
    and so does FSDP (`sharded`): its adapters' states are sharded already, and the
    FSDP-QLoRA recipes (Answer.AI, TRL, axolotl) train with torch's AdamW."""
    if optimizer == "auto":
        return "paged_adamw_8bit" if device == "cuda" and not sharded else "adamw_torch"
    return optimizer


def read_model_config(model_path: Path) -> dict:
    """The base model's config.json, as a dict (what app.domain.architectures reads)."""
    return json.loads((model_path / "config.json").read_text())


def check_model_trains_format(config: dict, data_format: str) -> None:
    """Refuse a format the base model cannot learn, before any tokenizing or loading.

    An encoder (BERT, RoBERTa) reads text but cannot write it: loaded as a causal LM it
    would be a masked-LM head run left to right. The API refuses such a job at creation;
    this holds for a job queued before the model was redeclared, or declared by path only.
    """
    if data_format == DatasetFormat.CLASSIFICATION:
        return
    if kind_from_config(config) is ModelKind.ENCODER:
        architecture = ", ".join(config.get("architectures") or []) or config.get("model_type")
        raise TrainingDataError(
            "unsupported_format_for_model",
            f"the base model is an encoder ({architecture}, model_type "
            f"{config.get('model_type')!r}): it trains classifiers only, and this job's "
            f"training file is in the {data_format!r} format; use a classification file "
            '({"text", "label"} lines) or a causal (decoder) base model',
        )


def encoder_input_limit(config: dict, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens an encoder reads, or None for a decoder.

    An encoder's learned position embeddings end there (BERT's 512): a longer input is an
    index error, not a slow step. The tokenizer's model_max_length says it exactly (RoBERTa
    offsets its positions by the pad id: 514 embeddings, 512 tokens); without one,
    max_position_embeddings. Decoders are left alone: their positions (RoPE) stretch, and
    their tokenizers' model_max_length is often stale.
    """
    if kind_from_config(config) is not ModelKind.ENCODER:
        return None
    limits = [config.get("max_position_embeddings"), tokenizer.model_max_length]
    known = [n for n in limits if isinstance(n, int) and 0 < n < VERY_LARGE_INTEGER]
    return min(known, default=None)


@dataclass
class QuantizedBase:
    """The loaded base, and what of it the adapter must train in full."""

    model: PreTrainedModel
    # Modules the checkpoint did not give (a new pooler, say), initialised at random:
    # trained in full and saved with the adapter, or they would stay noise.
    new_modules: list[str] = field(default_factory=list)


def load_quantized_base(
    model_path: Path,
    quant: QuantSpec,
    device: str,
    *,
    attention: str = "sdpa",
    gradient_checkpointing: bool | None = None,
    classes: list[str] | None = None,
) -> PreTrainedModel:
    """The frozen 4-bit base alone (see load_base_for_training), for callers that train
    nothing new in full: benchmarks, tests."""
    return load_base_for_training(
        model_path,
        quant,
        device,
        attention=attention,
        gradient_checkpointing=gradient_checkpointing,
        classes=classes,
    ).model


def load_base_for_training(
    model_path: Path,
    quant: QuantSpec,
    device: str,
    *,
    attention: str = "sdpa",
    gradient_checkpointing: bool | None = None,
    classes: list[str] | None = None,
    on_message: Callable[[str], None] = lambda message: None,
    sharded: bool = False,
) -> QuantizedBase:
    """The base model with its linear layers in 4-bit, frozen and ready for adapters.

    With `classes` it is loaded for sequence classification: the transformer with a new
    classification head (one output per class) in place of the language-model head. The
    head, and any linear layer the checkpoint does not hold at the model's shape, stays out
    of quantization (worker.training.checkpoint_layout); a head of another size is replaced,
    and `on_message` says so.

    `sharded` (FSDP across GPUs): the packed 4-bit weights are stored in the compute dtype
    instead of uint8 (bnb_4bit_quant_storage, as Answer.AI's FSDP-QLoRA, TRL and axolotl
    do), so FSDP can flatten them with the other parameters into one shardable buffer of a
    single dtype. The bytes, and the quantization, are the same.
    """
    compute_dtype = resolve_compute_dtype(quant.compute_dtype, device)
    if classes is not None:
        auto_class = AutoModelForSequenceClassification
        config = AutoConfig.from_pretrained(
            model_path,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: i for i, name in enumerate(classes)},
            trust_remote_code=False,
        )
    else:
        auto_class = AutoModelForCausalLM
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    layout = checkpoint_layout(model_path, auto_class, config, classification=classes is not None)
    for layer in layout.replaced:
        if not in_modules(layer.name, layout.head):  # another vocabulary, say: not this model
            raise ValueError(
                f"the checkpoint's `{layer.name}` has shape {list(layer.checkpoint_shape)} "
                f"where the model's config.json makes it {list(layer.model_shape)}: the "
                "weights do not belong to this config"
            )
        on_message(
            f"The checkpoint's classification head `{layer.name}` has "
            f"{layer.checkpoint_shape[0]} outputs; replaced by a new head with "
            f"{layer.model_shape[0]}, one per class"
        )
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
        llm_int8_skip_modules=layout.keep_full_precision,
    )
    model, loading_info = auto_class.from_pretrained(
        model_path,
        config=config,
        quantization_config=quantization_config,
        dtype=compute_dtype,  # for what stays unquantized: embeddings, norms, heads
        device_map={"": torch.cuda.current_device() if device == "cuda" else device},
        attn_implementation=attention,
        use_safetensors=True,  # never unpickle a checkpoint
        trust_remote_code=False,
        ignore_mismatched_sizes=bool(layout.replaced),  # in the head only (checked above)
        output_loading_info=True,
    )
    # The head is trained and saved by peft's SEQ_CLS already; anything else new joins it.
    new = [name for name in new_modules(model, loading_info) if not in_modules(name, layout.head)]
    for name in new:
        on_message(
            f"The checkpoint has no weights for `{name}`: it starts from random values and "
            "is trained in full, beside the adapters"
        )
    model.config.use_cache = False  # a KV cache only helps generation
    if device == "cpu":
        keep_cpu_weights_trainable(model)
    # Freezes the base, upcasts norms to float32 for stable gradients. Gradient
    # checkpointing trades compute for activation memory: worth it on a GPU, where memory
    # is the limit, not on the CPU, where time is.
    if gradient_checkpointing is None:
        gradient_checkpointing = device == "cuda"
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if sharded:
        keep_one_dtype(model, compute_dtype)
    return QuantizedBase(model, new)


def keep_one_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast back what prepare_model_for_kbit_training upcast to float32 (norms, embeddings,
    heads) to `dtype`, the 4-bit weights' storage dtype when sharded: FSDP flattens each
    wrapped block's parameters into one buffer and refuses a block of mixed dtypes ("Must
    flatten tensors with uniform dtype"). The adapters, added afterwards, are wrapped on
    their own. As Answer.AI's FSDP-QLoRA and TRL do, norms then run in the compute dtype."""
    for param in model.parameters():
        if param.dtype != dtype and param.is_floating_point() and not _is_4bit(param):
            param.data = param.data.to(dtype)


def _is_4bit(param: torch.Tensor) -> bool:
    return isinstance(param, bnb.nn.Params4bit)


def decoder_layer_classes(model: torch.nn.Module) -> list[str]:
    """The model's repeated transformer block classes (LlamaDecoderLayer, ...): FSDP's units
    of wrapping, one all-gather each. transformers names them in `_no_split_modules` (what
    must stay on one device); those the model actually contains, in the order found."""
    names: list[str] = []
    for module in model.modules():
        names.extend(getattr(module, "_no_split_modules", None) or [])
    present = {type(module).__name__ for module in model.modules()}
    return list(dict.fromkeys(name for name in names if name in present))


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


def add_lora(
    model: PreTrainedModel,
    lora: LoraSpec,
    *,
    classification: bool = False,
    modules_to_save: list[str] | None = None,
    parent: Path | None = None,
) -> PeftModel:
    """Wrap the frozen base with trainable low-rank adapters on the target modules.

    For classification (SEQ_CLS) peft also trains and saves the new classification head
    in full, as it must: it starts from random weights; `modules_to_save` are more such
    modules (QuantizedBase.new_modules). peft never puts an adapter inside a module it
    trains in full, with "all-linear" too: RoBERTa's head (classifier.dense, .out_proj)
    and a new pooler get none.

    With `parent` (a saved adapter of an earlier job on this base) training goes on from
    its weights, under its LoRA config: its rank, alpha, targets and trained-in-full modules
    are what those weights fit (the API gives the job the same), and only the dropout is
    this job's.
    """
    if parent is not None:
        return load_parent_adapter(
            model, parent, dropout=lora.dropout, classification=classification
        )
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # "all-linear": every nn.Linear / Linear4bit except the output head.
        target_modules=ALL_LINEAR if ALL_LINEAR in targets else list(targets),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
        task_type="SEQ_CLS" if classification else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_parent_adapter(
    model: PreTrainedModel, parent: Path, *, dropout: float, classification: bool = False
) -> PeftModel:
    """The parent's adapter on the base as the trainable adapter "default", in float32 (peft
    upcasts adapter weights by default), as a fresh one would be."""
    config = LoraConfig.from_pretrained(parent)
    wanted = "SEQ_CLS" if classification else "CAUSAL_LM"
    if config.task_type != wanted:
        raise ValueError(
            f"the parent adapter was trained for {config.task_type}, this job trains {wanted}: "
            "a classifier and a text generator cannot continue one another"
        )
    config.lora_dropout = dropout
    return PeftModel.from_pretrained(model, parent, is_trainable=True, config=config)


def parameter_counts(model: PeftModel) -> dict:
    """Trainable (adapters, and a classification head) and total parameters.

    A 4-bit weight is stored two to a byte, so its tensor holds half as many elements as
    the layer has weights; peft's count corrects for that.
    """
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_parameters": int(trainable), "total_parameters": int(total)}
