"""What a merge writes, decided from the checkpoint's headers and the model built on the
meta device before any weight is read: each base tensor's name in the merged model, which
of them the trained 4-bit model quantized, and that nothing the model needs is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.quantizers.quantizers_utils import should_convert_module

from worker.export.adapter_weights import AdapterMergeError, LoraAdapter
from worker.training.checkpoint_layout import (
    SAFETENSORS_INDEX,
    SAFETENSORS_WEIGHTS,
    checkpoint_layout,
    model_skeleton,
)


@dataclass
class MergePlan:
    config: object  # the merged model's PretrainedConfig (a classifier's: its labels)
    # Base checkpoint key -> (its name in the merged model, its shard file); tensors the
    # merged model has no place for (a causal LM's lm_head under a classifier) are absent.
    sources: dict[str, tuple[str, str]]
    quantized: set[str]  # merged-model weights the trained model held in 4-bit


def base_shards(base_dir: Path) -> dict[str, str]:
    """Every tensor of the base checkpoint -> the safetensors file holding it."""
    index = base_dir / SAFETENSORS_INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    if not (base_dir / SAFETENSORS_WEIGHTS).is_file():
        raise AdapterMergeError(f"{base_dir} has no safetensors weights")
    with safe_open(base_dir / SAFETENSORS_WEIGHTS, framework="pt") as f:
        return dict.fromkeys(f.keys(), SAFETENSORS_WEIGHTS)  # noqa: SIM118


def model_names(skeleton, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> the parameter it loads into, as from_pretrained renames it (legacy
    names, the base-model prefix). A tensor a converter assembles with others (fused
    experts) keeps its checkpoint name and is never merged into."""
    mapping = get_model_conversion_mapping(skeleton)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta_state = skeleton.state_dict()
    prefix = skeleton.base_model_prefix
    names: dict[str, str] = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if converter is not None:
            names[key] = key
        elif name in meta_state:
            names[key] = name
    return names


def plan_merge(base_dir: Path, adapter: LoraAdapter) -> MergePlan:
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        raise AdapterMergeError(
            "the base checkpoint is already quantized; merge needs 16-bit weights"
        )
    classes = None
    auto_class = AutoModelForCausalLM
    if adapter.task_type == "SEQ_CLS":
        classes = adapter.classes()
        if classes is None:
            raise AdapterMergeError(
                "a classifier's adapter needs its classes.json (its outputs' names) to merge"
            )
        auto_class = AutoModelForSequenceClassification
        config = AutoConfig.from_pretrained(
            base_dir,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: i for i, name in enumerate(classes)},
            trust_remote_code=False,
        )
    skeleton = model_skeleton(auto_class, config)
    config.architectures = [type(skeleton).__name__]
    shards = base_shards(base_dir)
    names = model_names(skeleton, list(shards))
    sources = {key: (names[key], shards[key]) for key in shards if key in names}

    # The trained model's 4-bit layers: every nn.Linear transformers did not skip, by the
    # same skip list training loaded with (worker.training.checkpoint_layout).
    skips = checkpoint_layout(
        base_dir, auto_class, config, classification=classes is not None
    ).keep_full_precision
    quantized = {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, skips)
    }

    produced = {name for name, _ in sources.values()}
    for param in adapter.layers:
        if param not in produced:
            raise AdapterMergeError(
                f"the adapter trains {param.removesuffix('.weight')}, which the base "
                "checkpoint does not hold: it was trained on another base model"
            )
    tied = set(skeleton.all_tied_weights_keys)
    needed = set(skeleton.state_dict()) - tied
    # Buffers a model computes itself (rotary frequencies) are not saved either.
    needed &= {name for name, _ in skeleton.named_parameters()}
    missing = sorted(needed - produced - set(adapter.full))
    if missing:
        raise AdapterMergeError(
            f"neither the base checkpoint nor the adapter holds {', '.join(missing[:5])}: "
            "the merged model would start those from random values"
        )
    return MergePlan(config, sources, quantized)
