"""A saved peft LoRA adapter read for merging: each target layer's update and the modules
trained in full, fetched one at a time so the adapter never sits in memory whole."""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CLASSES_FILE = "classes.json"
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


class AdapterMergeError(ValueError):
    """The adapter cannot be merged into this base (or not by this code): the message says why."""


def pattern_value(pattern: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: the first key the module's name ends with
    (at a dot) or matches as a regex."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraLayer:
    module: str  # the model's module name, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    scaling: float


class LoraAdapter:
    """An adapter directory opened for reading (a context manager: it holds the file open)."""

    def __init__(self, adapter_dir: Path) -> None:
        self.dir = Path(adapter_dir)
        self.config = json.loads((self.dir / ADAPTER_CONFIG).read_text())
        self._check_config()
        self._stack = ExitStack()
        self._file = self._stack.enter_context(
            safe_open(self.dir / ADAPTER_WEIGHTS, framework="pt")
        )
        self.layers: dict[str, LoraLayer] = {}  # by the module's weight, e.g. ...q_proj.weight
        self.full: dict[str, str] = {}  # a parameter trained in full -> its key in the file
        self._index()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    @property
    def task_type(self) -> str:
        return self.config.get("task_type") or "CAUSAL_LM"

    def classes(self) -> list[str] | None:
        """A classifier's class names, output by output (written beside its adapter)."""
        path = self.dir / CLASSES_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _check_config(self) -> None:
        config = self.config
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterMergeError(f"only LoRA adapters merge; this is {config['peft_type']}")
        if self.task_type not in TASK_TYPES:
            raise AdapterMergeError(
                f"the adapter's task type {self.task_type!r} is not one Lathe trains "
                f"({', '.join(TASK_TYPES)})"
            )
        # Each of these changes what the layer computes beyond W + scale * B @ A.
        unsupported = {
            "use_dora": "DoRA",
            "lora_bias": "a LoRA bias",
            "use_qalora": "QA-LoRA",
            "layer_replication": "layer replication",
            "trainable_token_indices": "trainable tokens",
        }
        for key, name in unsupported.items():
            if config.get(key):
                raise AdapterMergeError(f"the adapter uses {name}, which this merge does not do")
        if config.get("bias", "none") != "none":
            raise AdapterMergeError(
                f"the adapter trains biases (bias={config['bias']!r}), which this merge does not do"
            )

    def _scaling(self, module: str, rank: int) -> float:
        config = self.config
        rank = int(pattern_value(config.get("rank_pattern") or {}, module, rank))
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        # rsLoRA scales by alpha / sqrt(r), plain LoRA by alpha / r (peft's LoraLayer).
        return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    def _index(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for key in self._file.keys():  # noqa: SIM118 (safe_open is not a mapping)
            name = key.removeprefix(PEFT_PREFIX)
            match = LORA_KEY.match(name)
            if match:
                pairs.setdefault(match["module"], {})[match["side"]] = key
            elif "lora_" in name:  # an embedding's lora_embedding_A, a magnitude vector...
                raise AdapterMergeError(f"the adapter holds {key!r}, which this merge does not do")
            else:
                self.full[name] = key
        for module, sides in pairs.items():
            if set(sides) != {"A", "B"}:
                raise AdapterMergeError(f"the adapter's {module} has lora_A or lora_B alone")
            rank = self._file.get_slice(sides["A"]).get_shape()[0]
            self.layers[f"{module}.weight"] = LoraLayer(
                module, sides["A"], sides["B"], self._scaling(module, rank)
            )

    def delta(self, param: str, device: str = "cpu") -> torch.Tensor:
        """scale * B @ A for the layer whose weight is `param`, in float32, shaped like it."""
        layer = self.layers[param]
        a = self._file.get_tensor(layer.a_key).to(device, torch.float32)
        b = self._file.get_tensor(layer.b_key).to(device, torch.float32)
        delta = (b @ a) * layer.scaling
        # GPT-2-style Conv1D stores its weight transposed (peft's fan_in_fan_out).
        return delta.T if self.config.get("fan_in_fan_out") else delta

    def full_tensor(self, param: str) -> torch.Tensor:
        return self._file.get_tensor(self.full[param])
