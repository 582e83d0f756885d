"""The GPU levers, each a job option (training.attention, .liger, .micro_batch_tokens): what
"auto" means on this device and model, and applying them.

Every lever changes how a step is computed, never what it computes: the losses equal the
plain path's within float tolerance (tests/worker/test_levers*.py; on a GPU, `pytest -m gpu`).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from app.domain.architectures import kind_from_config
from app.domain.memory import (
    AUTO_PACKED_ROWS,
    GB,
    ModelShape,
    parameters_from_shape,
    token_budget,
)

AUTO = "auto"

# Model types liger-kernel patches with all four kernels (RMSNorm, SwiGLU, RoPE, fused linear
# cross-entropy) and that Lathe trains; others train without Liger under "auto".
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_attention(option: str, device: str, *, packed: bool) -> str:
    """The attention implementation to load the base with.

    "auto": on a GPU with packed rows, a kernel that takes the rows' sequence boundaries and
    builds no quadratic mask: flash-attention 2 where installed, else PyTorch's flex
    attention (a document mask from the position ids); otherwise SDPA. Flex attention has
    no backward on the CPU, so the CPU always gets SDPA.
    """
    if option != AUTO:
        return option
    if device != "cuda" or not packed:
        return "sdpa"
    return "flash_attention_2" if flash_attention_installed() else "flex_attention"


def resolve_liger(
    option: bool | str, device: str, model_type: str | None, *, causal_lm: bool = True
) -> bool:
    """Whether to patch Liger's kernels in. "auto": on a GPU, for a causal LM of a model
    type Liger covers. Its kernels are Triton, CUDA only: the CPU never gets them, and
    asking for them there (True) is an error rather than a silent no-op; so is asking for
    them for a classifier (the fused loss is next-token cross-entropy) or another model."""
    if option == AUTO:
        return (
            device == "cuda" and causal_lm and model_type in LIGER_MODEL_TYPES and liger_installed()
        )
    if not option:
        return False
    if device != "cuda":
        raise ValueError("training.liger needs a CUDA GPU: Liger's kernels are Triton kernels")
    if not causal_lm or model_type not in LIGER_MODEL_TYPES:
        raise ValueError(
            f"training.liger covers causal LMs of types {', '.join(sorted(LIGER_MODEL_TYPES))}; "
            f"this job trains a {'causal LM' if causal_lm else 'classifier'} of type "
            f"{model_type!r}"
        )
    return True


def apply_liger(model: PreTrainedModel) -> None:
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy on the loaded base,
    before the adapters go on.

    The fused loss computes the vocabulary logits chunk by chunk inside the loss, so the
    full [tokens x vocabulary] logits tensor is never materialised (128k entries per token
    for Llama 3). The 4-bit layers stay as they are: the SwiGLU kernel replaces only the
    activation between them, and the output head, which bitsandbytes leaves unquantized and
    LoRA does not adapt, is the fused loss's weight.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in LIGER_MODEL_TYPES:
        raise ValueError(f"Liger's kernels do not cover model type {model_type!r}")
    keep_module(type(model).__module__)
    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=True,
    )


# The globals of transformers.models modules to put back, one snapshot per open
# transformers_globals_kept, by module name.
_kept: list[dict[str, dict]] = []


@contextmanager
def transformers_globals_kept() -> Iterator[None]:
    """Undo, on exit, what Liger patches module-wide.

    Liger's RoPE (and the classes it swaps for models built later) is set on the model's
    modeling module, not the instance: left there, the worker's next job would get Liger's
    kernels whatever it asked for. Every transformers.models module loaded on entry, and
    any that apply_liger patches after (one first imported during the run), is put back as
    it was.
    """
    saved = {
        name: dict(vars(module))
        for name, module in list(sys.modules.items())
        if name.startswith("transformers.models.")
    }
    _kept.append(saved)
    try:
        yield
    finally:
        _kept.pop()
        for name, before in saved.items():
            module_vars = vars(sys.modules[name])
            for key, value in before.items():
                if module_vars.get(key) is not value:
                    module_vars[key] = value


def keep_module(name: str) -> None:
    """Have the open transformers_globals_kept put module `name` back too."""
    if _kept and name not in _kept[-1]:
        _kept[-1][name] = dict(vars(sys.modules[name]))


def model_shape(config: dict) -> ModelShape | None:
    """A model's shape from its config.json, for the memory estimate; None when the config
    does not name it the usual way."""
    hidden = config.get("hidden_size")
    layers = config.get("num_hidden_layers")
    vocab = config.get("vocab_size")
    if not all(isinstance(n, int) and n > 0 for n in (hidden, layers, vocab)):
        return None
    intermediate = config.get("intermediate_size")
    return ModelShape(
        parameters=parameters_from_shape(
            kind_from_config(config),
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=vocab,
            intermediate_size=intermediate if isinstance(intermediate, int) else None,
        ),
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        intermediate_size=intermediate if isinstance(intermediate, int) else None,
    )


def gpu_memory_gb() -> float:
    """The current GPU's memory, in GiB."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB


def resolve_micro_batch_tokens(
    option: int | str,
    device: str,
    *,
    max_seq_length: int,
    batch_size: int,
    packed: bool,
    shape: ModelShape | None = None,
    memory_gb: float | None = None,
    **estimate,
) -> int | None:
    """How many tokens one micro-batch may hold; None: the whole batch at once.

    A number is taken as given. "auto": a packed micro-batch of AUTO_PACKED_ROWS x
    max_seq_length tokens, a padded batch whole; on a GPU, no more than the memory estimate
    fits on it (app.domain.memory.token_budget, with the run's attention, checkpointing
    and loss as `estimate` keywords) when the config gives the model's shape. A micro-batch
    holds at least one example whatever the budget.
    """
    if option != AUTO:
        return int(option)
    wanted = AUTO_PACKED_ROWS * max_seq_length if packed else None
    if device != "cuda" or shape is None:
        return wanted
    if memory_gb is None:
        memory_gb = gpu_memory_gb()
    fits = token_budget(
        shape,
        memory_gb,
        seq_len=max_seq_length,
        batch_size=batch_size,
        packed=packed,
        **estimate,
    )
    if wanted is None:
        return None if fits >= batch_size * max_seq_length else fits
    return min(wanted, fits)
