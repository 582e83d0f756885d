"""Which layers a checkpoint holds for the model about to be loaded from it, read before
loading: what must stay out of 4-bit quantization, and what starts from random weights.

transformers turns every nn.Linear not on its skip list into a bitsandbytes Linear4bit
before the weights are read, and quantizes each one as its checkpoint tensor arrives. A
linear layer the checkpoint does not hold (the new `classifier` of a BERT saved for
pre-training, its pooler when that was not saved) or holds at another shape (a 2-label
head, 4 classes wanted) is never quantized: it stays a Linear4bit around a plain float
weight without a quantization state, and bitsandbytes fails an assertion at the first
forward. Its default skip list names the model's last *parameter* ("classifier.bias"),
which does not match the module, so even the head is converted.

So the skip list is built here: transformers' own default, the classification head, and
every linear layer the checkpoint does not hold at the model's shape. Those stay torch
Linear layers in the compute dtype. Only the checkpoint's header is read (tensor names and
shapes), and the model is built on the meta device, so this costs no weights in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.quantizers.base import get_keys_to_not_convert

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ReplacedLayer:
    """A layer the checkpoint holds at another shape: it can only be loaded as a new one."""

    name: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointLayout:
    """How the model about to be loaded fits its checkpoint."""

    head: list[str]  # the classification head's modules (top-level `classifier`/`score`)
    missing: list[str]  # linear layers the checkpoint has no weight for (new, random)
    # Layers (linear or not: an embedding of another vocabulary) held at another shape.
    replaced: list[ReplacedLayer] = field(default_factory=list)
    default_skips: list[str] = field(default_factory=list)  # transformers' own (tied, output)

    @property
    def keep_full_precision(self) -> list[str]:
        """llm_int8_skip_modules: modules left out of 4-bit quantization.

        transformers drops its default list when one is passed, so it is included.
        """
        names = [*self.default_skips, *self.head, *self.missing]
        names += [layer.name for layer in self.replaced]
        return sorted(set(names))


def in_modules(name: str, modules: list[str]) -> bool:
    """Whether module `name` is one of `modules` or inside one of them."""
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def checkpoint_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors headers only (no weights read)."""
    index = model_path / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [SAFETENSORS_WEIGHTS]
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with safe_open(model_path / shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def model_skeleton(auto_class: type, config: PretrainedConfig) -> PreTrainedModel:
    """The model's modules and shapes without memory: every tensor on the meta device."""
    with torch.device("meta"):
        return auto_class.from_config(config)


def loaded_shapes(
    skeleton: PreTrainedModel, shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...] | None]:
    """The checkpoint's tensors under the model's parameter names, as from_pretrained maps
    them: its renamings (legacy gamma/beta and per-architecture ones) and the base-model
    prefix added or stripped ("bert." missing from a BertModel checkpoint loaded into
    BertForSequenceClassification). A tensor assembled from several (a converter's, e.g.
    experts fused into one) maps to None: its shape is the converter's business."""
    mapping = get_model_conversion_mapping(skeleton)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    meta_state = skeleton.state_dict()
    prefix = skeleton.base_model_prefix
    loaded: dict[str, tuple[int, ...] | None] = {}
    for key, shape in shapes.items():
        name, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, converter = rename_source_key(key, [], [], prefix, meta_state)
        if name in meta_state:
            loaded[name] = None if converter is not None else shape
    return loaded


def head_modules(skeleton: PreTrainedModel) -> list[str]:
    """The classification head, by the names peft's SEQ_CLS trains and saves in full."""
    return [name for name, _ in skeleton.named_children() if name in SEQ_CLS_HEAD_NAMES]


def checkpoint_layout(
    model_path: Path, auto_class: type, config: PretrainedConfig, *, classification: bool
) -> CheckpointLayout:
    """Compare the model `auto_class` builds from `config` with the checkpoint's tensors."""
    skeleton = model_skeleton(auto_class, config)
    loaded = loaded_shapes(skeleton, checkpoint_shapes(model_path))
    tied = set(skeleton.all_tied_weights_keys)  # loaded from the tensor they are tied to
    missing = [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear)
        and f"{name}.weight" not in loaded
        and f"{name}.weight" not in tied
    ]
    replaced: dict[str, ReplacedLayer] = {}
    for key, tensor in skeleton.state_dict().items():
        held = loaded.get(key)
        if held is None or held == tuple(tensor.shape):
            continue
        name = key.rsplit(".", 1)[0]
        if name not in replaced or key.endswith(".weight"):  # a layer by its weight's shape
            replaced[name] = ReplacedLayer(name, held, tuple(tensor.shape))
    return CheckpointLayout(
        head=head_modules(skeleton) if classification else [],
        missing=missing,
        replaced=list(replaced.values()),
        default_skips=get_keys_to_not_convert(skeleton),
    )


def new_modules(model: PreTrainedModel, loading_info: dict) -> list[str]:
    """Modules holding weights the checkpoint did not give (missing, or dropped for their
    shape): from_pretrained initialised them at random. Only those outside 4-bit can be
    trained in full; a quantized layer is never among them (see checkpoint_layout)."""
    keys = set(loading_info.get("missing_keys", ()))
    keys |= {mismatch[0] for mismatch in loading_info.get("mismatched_keys", ())}
    modules = {key.rsplit(".", 1)[0] for key in keys if "." in key}
    return sorted(
        name
        for name in modules
        if not any(
            getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8
            for p in model.get_submodule(name).parameters(recurse=False)
        )
    )
