"""GPU memory estimates for a QLoRA job, and which GPU classes can hold it.

The estimate decides which GPU classes a job is eligible for before it is queued, so a job
never waits for a GPU it cannot fit on. It is deliberately simple and slightly generous:
a job sent to a class too small fails with an out-of-memory error after waiting in line,
which is worse than waiting for a larger GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from app.domain.architectures import ALL_LINEAR, ModelKind, linear_layers_per_block

GB = 1024**3
"""Bytes per GB (GiB), as GPU memory is quoted by drivers and nvidia-smi."""

NF4_BITS_PER_PARAM = 4.0
"""QLoRA stores frozen base weights as 4-bit NormalFloat (NF4)."""

QUANT_CONSTANT_BITS = 0.5
"""One fp32 absmax constant per 64-weight block: 32/64 = 0.5 bit per parameter."""

DOUBLE_QUANT_CONSTANT_BITS = 0.127
"""Double quantization (QLoRA paper, sec. 3): the constants quantized to 8 bit in blocks of
256 with one fp32 second-level constant, 8/64 + 32/(64*256) = 0.127 bit per parameter."""

LORA_BYTES_PER_PARAM = 16
"""LoRA adapter params are trained in fp32: weight 4 + gradient 4 + Adam m 4 + Adam v 4."""

LINEAR_PER_LAYER = linear_layers_per_block(ModelKind.CAUSAL)
"""Linear layers in a Llama-style block: q, k, v, o in attention; gate, up, down in the MLP
(an encoder block has 6: app/domain/architectures.py)."""

CHECKPOINTED_ACTIVATION_FACTOR = 4
"""Bytes per hidden value and layer kept with gradient checkpointing: the layer's bf16
input (2), about doubled while one layer is recomputed in the backward pass."""

FULL_ACTIVATION_FACTOR = 34
"""Without checkpointing a layer keeps every intermediate for the backward pass: about 34
bytes per hidden value in bf16 (Korthikanti et al., 2022, with the MLP at ~2.7x hidden and
without the attention scores, which SDPA does not keep)."""


def adapted_matrices(target_modules: list[str], kind: ModelKind | str = ModelKind.CAUSAL) -> int:
    """How many weight matrices per layer get an adapter: named modules one each (a name
    matches one module per block), "all-linear" every linear layer of the kind's block."""
    if ALL_LINEAR in target_modules:
        return linear_layers_per_block(kind)
    return len(target_modules)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    """Total parameter count."""
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int | None = None


def parameters_from_shape(
    kind: ModelKind | str,
    *,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    intermediate_size: int | None = None,
) -> int:
    """A parameter count from a config.json's shape, for a model that declares none.

    A block holds 4·hidden² of attention and its MLP: three hidden x intermediate matrices
    in a gated (Llama) decoder, two in an encoder; without an intermediate size, the
    usual 8/3·hidden and 4·hidden. Embeddings count once for an encoder and twice for a
    decoder (an untied output head, the larger case).
    """
    if ModelKind(kind) is ModelKind.ENCODER:
        mlp = 2 * hidden_size * (intermediate_size or 4 * hidden_size)
        embeddings = vocab_size * hidden_size
    else:
        mlp = 3 * hidden_size * (intermediate_size or 8 * hidden_size // 3)
        embeddings = 2 * vocab_size * hidden_size
    return num_layers * (4 * hidden_size**2 + mlp) + embeddings


@dataclass(frozen=True)
class MemoryEstimate:
    base_weights_gb: float
    """Frozen base model in NF4: 4 bits per parameter plus the quantization constants."""
    lora_gb: float
    """What is trained, with its gradients and Adam states, 16 bytes a parameter: the LoRA
    adapters, and a classifier's head (trained in full)."""
    activations_gb: float
    """Activations kept for the backward pass (few with gradient checkpointing), plus the fp32
    vocabulary logits and their gradient (none for a classifier: it has a few outputs)."""
    overhead_gb: float
    """CUDA context, cuBLAS workspaces and allocator fragmentation."""

    @property
    def total_gb(self) -> float:
        return self.base_weights_gb + self.lora_gb + self.activations_gb + self.overhead_gb


def shape_from_parameters(parameters: int) -> ModelShape:
    """A rough Llama-like shape when only the parameter count is known.

    A decoder layer holds about 12·hidden² parameters (4·hidden² attention, 8·hidden² MLP)
    and such models have about hidden/128 layers, so parameters ≈ 12·hidden³/128. The layer
    count is clamped to [2, 128] and the hidden size then solved from it. For 7B this gives
    33 layers of 4204, close to Llama 2 7B's 32 of 4096.
    """
    if parameters <= 0:
        raise ValueError(f"parameters must be > 0, got {parameters}")
    hidden_guess = (parameters * 128 / 12) ** (1 / 3)
    num_layers = min(128, max(2, round(hidden_guess / 128)))
    hidden_size = max(1, round(math.sqrt(parameters / (12 * num_layers))))
    return ModelShape(
        parameters=parameters,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vocab_size=32000,
    )


def estimate_memory_gb(
    shape: ModelShape,
    *,
    lora_r: int,
    target_modules: int,
    batch_size: int,
    seq_len: int,
    double_quant: bool = True,
    gradient_checkpointing: bool = True,
    overhead_gb: float = 0.5,
    classification: bool = False,
) -> MemoryEstimate:
    """Peak GPU memory for QLoRA training of `shape`, term by term.

    `target_modules` is the number of projection matrices per layer that get an adapter
    (e.g. 4 for q, k, v, o; adapted_matrices counts them). Every adapted matrix is treated
    as hidden x hidden, which undercounts MLP projections a little; the overhead term
    absorbs that. A classifier (`classification`) computes a few class scores instead of
    the vocabulary's logits, and trains its head in full: a hidden x hidden layer (BERT's
    pooler, RoBERTa's dense) and the small output layer, counted as one hidden².
    """
    for name, value in (
        ("lora_r", lora_r),
        ("target_modules", target_modules),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    constant_bits = DOUBLE_QUANT_CONSTANT_BITS if double_quant else QUANT_CONSTANT_BITS
    base_bytes = shape.parameters * (NF4_BITS_PER_PARAM + constant_bits) / 8

    # A and B of a rank-r adapter on a hidden x hidden matrix: r·hidden each.
    lora_params = 2 * lora_r * shape.hidden_size * target_modules * shape.num_layers
    head_params = shape.hidden_size**2 if classification else 0
    lora_bytes = (lora_params + head_params) * LORA_BYTES_PER_PARAM

    tokens = batch_size * seq_len
    factor = CHECKPOINTED_ACTIVATION_FACTOR if gradient_checkpointing else FULL_ACTIVATION_FACTOR
    layer_bytes = tokens * shape.hidden_size * shape.num_layers * factor
    # Logits are upcast to fp32 for the loss, and their gradient is the same size. A
    # classifier's few class scores per example are too small to count.
    logits_bytes = 0 if classification else tokens * shape.vocab_size * 4 * 2

    return MemoryEstimate(
        base_weights_gb=base_bytes / GB,
        lora_gb=lora_bytes / GB,
        activations_gb=(layer_bytes + logits_bytes) / GB,
        overhead_gb=overhead_gb,
    )


def fitting_classes(needed_gb: float, classes: Mapping[str, float]) -> list[str]:
    """GPU class names with at least `needed_gb` of memory, smallest first (ties by name).

    Smallest first, so a caller that takes the first entry uses the smallest GPU that fits
    and leaves the large ones to jobs that need them.
    """
    fitting = [(memory_gb, name) for name, memory_gb in classes.items() if memory_gb >= needed_gb]
    return [name for _, name in sorted(fitting)]


def eligible_classes(
    gpu_class: str | None, needed_gb: float, classes: Mapping[str, float]
) -> frozenset[str]:
    """The classes a job may run on: the one it asked for, else every class it fits."""
    if gpu_class:
        return frozenset([gpu_class])
    return frozenset(fitting_classes(needed_gb, classes))
