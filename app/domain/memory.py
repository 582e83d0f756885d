"""GPU memory estimates for a QLoRA job, and which GPU classes can hold it.

The estimate decides which GPU classes a job is eligible for before it is queued, so a job
never waits for a GPU it cannot fit on. It is deliberately simple and slightly generous:
a job sent to a class too small fails with an out-of-memory error after waiting in line,
which is worse than waiting for a larger GPU. A multi-GPU job's figure is per GPU (each of
its GPUs must hold it), under DDP or FSDP.
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

SDPA_MASK_BYTES = 3
"""Bytes per query-key pair of a materialised attention mask: a packed row (or a padded
batch) under SDPA gets a boolean 4D mask (1 byte), which the kernel takes as an additive
bias in the compute dtype (2 bytes). Quadratic in the row's length; flash-attention and
flex attention take the sequence boundaries instead and need none."""

EAGER_SCORE_BYTES = 6
"""Bytes per query-key pair and head of eager attention: the fp32 scores (4) and the bf16
probabilities kept for the backward pass (2), in every layer unless checkpointed."""

HEAD_DIM = 128
"""The usual attention head size (Llama, Mistral, Qwen): heads = hidden / 128."""

FUSED_LOSS_CHUNK_FACTOR = 8
"""Bytes per token and hidden value of a fused linear cross-entropy (Liger): the logits are
computed chunk by chunk and never held for the whole batch; what remains is about an fp32
hidden-sized gradient and chunk per token (4 + 4)."""

VARLEN_ATTENTION = frozenset({"flash_attention_2", "flex_attention"})
"""Attention implementations that take packed rows' boundaries and build no quadratic mask."""

# --- Multi-GPU jobs (a job's `gpus` and `parallelism`): each figure is per GPU ----------

DDP = "ddp"
FSDP = "fsdp"
PARALLELISMS = (DDP, FSDP)
"""DDP: each GPU holds the whole model and trains its share of the batch, the gradients
averaged after each backward. FSDP: the weights, the trained parameters, their gradients
and optimizer states are sharded over the GPUs, a block gathered whole while it runs."""

DDP_BUCKET_BYTES_PER_PARAM = 4
"""DDP copies every trained parameter's fp32 gradient into its all-reduce buckets (unless
the gradients are views of the buckets, which Trainer does not ask for)."""

FSDP_GATHERED_BLOCKS = 2
"""FSDP all-gathers a wrapped unit (one decoder block) whole for its forward and backward,
and prefetches the next one: about two blocks' weights whole beside each GPU's shard."""

COLLECTIVE_OVERHEAD_GB = 0.25
"""NCCL's communicator buffers and streams on each GPU of a multi-GPU job. Provisional: a
generous round figure until the GPU check measures one."""


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
    """Frozen base model in NF4: 4 bits per parameter plus the quantization constants (under
    FSDP, a GPU's shard and the blocks gathered whole)."""
    lora_gb: float
    """What is trained, with its gradients and Adam states, 16 bytes a parameter: the LoRA
    adapters, and a classifier's head (trained in full); under DDP plus its gradient
    buckets, under FSDP a GPU's shard."""
    activations_gb: float
    """Activations kept for the backward pass (few with gradient checkpointing), plus the fp32
    vocabulary logits and their gradient (none for a classifier: it has a few outputs)."""
    overhead_gb: float
    """CUDA context, cuBLAS workspaces and allocator fragmentation; NCCL's on a multi-GPU
    job."""

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
    micro_batch_tokens: int | None = None,
    packed: bool = False,
    attention: str = "sdpa",
    fused_loss: bool = False,
    gpus: int = 1,
    parallelism: str = DDP,
) -> MemoryEstimate:
    """Peak memory of one GPU for QLoRA training of `shape`, term by term.

    `target_modules` is the number of projection matrices per layer that get an adapter
    (e.g. 4 for q, k, v, o; adapted_matrices counts them). Every adapted matrix is treated
    as hidden x hidden, which undercounts MLP projections a little; the overhead term
    absorbs that. A classifier (`classification`) computes a few class scores instead of
    the vocabulary's logits, and trains its head in full: a hidden x hidden layer (BERT's
    pooler, RoBERTa's dense) and the small output layer, counted as one hidden².

    Activations are those of one micro-batch: `micro_batch_tokens` tokens (training.
    micro_batch_tokens; at least one seq_len example, at most the whole batch), or without
    it the whole batch of batch_size x seq_len. A `packed` micro-batch is one row of all its
    tokens, padded ones are rows of seq_len: under "sdpa" or "eager" `attention` either
    costs a mask (and eager its scores) quadratic in the row's length; "flash_attention_2"
    and "flex_attention" cost none. `fused_loss` (Liger's fused linear cross-entropy) never
    holds the vocabulary's logits.

    With `gpus` > 1 each GPU trains batch_size / gpus examples a step (the micro-batch
    budget applies to that share), and a collective-communication overhead is added. Under
    "ddp" `parallelism` each GPU also holds the whole base and adapter, plus DDP's gradient
    buckets; under "fsdp" the base weights and the trained parameters with their gradients
    and optimizer states are sharded over the GPUs, plus the blocks gathered whole while
    they run. With one GPU `parallelism` changes nothing.
    """
    for name, value in (
        ("lora_r", lora_r),
        ("target_modules", target_modules),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("gpus", gpus),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
    sharded = gpus > 1 and parallelism == FSDP
    constant_bits = DOUBLE_QUANT_CONSTANT_BITS if double_quant else QUANT_CONSTANT_BITS
    base_bytes = shape.parameters * (NF4_BITS_PER_PARAM + constant_bits) / 8
    if sharded:
        gathered = base_bytes * min(1.0, FSDP_GATHERED_BLOCKS / shape.num_layers)
        base_bytes = min(base_bytes, base_bytes / gpus + gathered)

    # A and B of a rank-r adapter on a hidden x hidden matrix: r·hidden each.
    lora_params = 2 * lora_r * shape.hidden_size * target_modules * shape.num_layers
    head_params = shape.hidden_size**2 if classification else 0
    lora_bytes = (lora_params + head_params) * LORA_BYTES_PER_PARAM
    if sharded:
        lora_bytes /= gpus
    elif gpus > 1:
        lora_bytes += (lora_params + head_params) * DDP_BUCKET_BYTES_PER_PARAM

    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    tokens = micro_tokens(rank_batch_size(batch_size, gpus), seq_len, micro_batch_tokens)
    factor = CHECKPOINTED_ACTIVATION_FACTOR if gradient_checkpointing else FULL_ACTIVATION_FACTOR
    layer_bytes = tokens * shape.hidden_size * shape.num_layers * factor
    # Logits are upcast to fp32 for the loss, and their gradient is the same size. A
    # classifier's few class scores per example are too small to count.
    # Liger's fused loss holds a chunk of them at a time: about an fp32 hidden per token.
    if classification:
        logits_bytes = 0
    elif fused_loss:
        logits_bytes = tokens * shape.hidden_size * FUSED_LOSS_CHUNK_FACTOR
    else:
        logits_bytes = tokens * shape.vocab_size * 4 * 2
    attention_bytes = attention_mask_bytes(
        shape,
        tokens=tokens,
        row_length=tokens if packed else seq_len,
        attention=attention,
        gradient_checkpointing=gradient_checkpointing,
    )

    return MemoryEstimate(
        base_weights_gb=base_bytes / GB,
        lora_gb=lora_bytes / GB,
        activations_gb=(layer_bytes + logits_bytes + attention_bytes) / GB,
        overhead_gb=overhead_gb + (COLLECTIVE_OVERHEAD_GB if gpus > 1 else 0.0),
    )


def rank_batch_size(batch_size: int, gpus: int) -> int:
    """The examples one GPU trains a step: its share of the batch (the API keeps the batch
    a multiple of the GPUs; rounded up otherwise, erring large)."""
    return -(-batch_size // gpus)


def auto_parallelism(ddp_gb: float, largest_gb: float | None, *, fsdp_allowed: bool) -> str:
    """A multi-GPU job's parallelism when it asks none: DDP (no gathering, the least
    communication) when its per-GPU figure fits the largest class able to run it, else FSDP
    (where the job can use it). `largest_gb` None: no such class is known yet (the job waits
    for one), DDP."""
    if not fsdp_allowed or largest_gb is None or ddp_gb <= largest_gb:
        return DDP
    return FSDP


def micro_tokens(batch_size: int, seq_len: int, micro_batch_tokens: int | None) -> int:
    """The tokens of one micro-batch: the budget, but never less than one example of seq_len
    (a micro-batch holds at least one) nor more than the whole batch."""
    whole = batch_size * seq_len
    if micro_batch_tokens is None:
        return whole
    return min(whole, max(seq_len, micro_batch_tokens))


def attention_mask_bytes(
    shape: ModelShape,
    *,
    tokens: int,
    row_length: int,
    attention: str,
    gradient_checkpointing: bool,
) -> int:
    """What attention costs beyond the layer activations: nothing for a varlen kernel; a
    materialised mask per row for SDPA; the scores of every head (and layer, without
    checkpointing) for eager."""
    if attention in VARLEN_ATTENTION:
        return 0
    rows = max(1, tokens // row_length)
    pairs = rows * row_length**2
    if attention == "eager":
        heads = max(1, shape.hidden_size // HEAD_DIM)
        layers = 1 if gradient_checkpointing else shape.num_layers
        return pairs * heads * EAGER_SCORE_BYTES * layers
    return pairs * SDPA_MASK_BYTES


def token_budget(
    shape: ModelShape,
    memory_gb: float,
    *,
    seq_len: int,
    batch_size: int,
    headroom: float = 0.9,
    **settings,
) -> int:
    """The most tokens a micro-batch may hold on a GPU of `memory_gb` (training.
    micro_batch_tokens "auto" on a GPU): the largest count whose estimate stays within
    `headroom` of the memory, between one seq_len example and the GPU's share of the batch
    (the whole batch on one GPU). `settings` are estimate_memory_gb's other keywords
    (lora_r, target_modules, packed, gpus, parallelism, ...)."""

    def fits(tokens: int) -> bool:
        estimate = estimate_memory_gb(
            shape, batch_size=batch_size, seq_len=seq_len, micro_batch_tokens=tokens, **settings
        )
        return estimate.total_gb <= memory_gb * headroom

    low, high = seq_len, rank_batch_size(batch_size, settings.get("gpus", 1)) * seq_len
    if not fits(low):
        return low  # one example is the least a micro-batch can hold
    if fits(high):
        return high
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


AUTO_PACKED_ROWS = 1
"""A packed micro-batch under training.micro_batch_tokens "auto" holds about this many
max_seq_length rows' tokens (the worker's sizing, worker.training.levers). Provisional: 1 is
the sizing from before the option, the one issue 15's peak-memory targets were set against
(a larger micro-batch is faster only until the GPU's matrix units are busy, and costs
activation memory all the way); the GPU check's sweep of explicit values is to set it."""


def lever_settings(
    training: Mapping[str, object], *, seq_len: int, classification: bool = False
) -> dict:
    """estimate_memory_gb's keywords for a job's stored training options (TrainingIn), as a
    GPU runs them, erring large: "auto" attention on packed rows is a varlen kernel (flash
    or flex: no mask either way); "auto" Liger may not apply (a model type it lacks), so
    only `true` drops the logits; an "auto" micro-batch is what the worker wants (packed,
    AUTO_PACKED_ROWS rows of seq_len; padded, the whole batch), a given one as given."""
    packed = training.get("packing", True) is not False and not classification
    attention = str(training.get("attention", "sdpa"))
    if attention == "auto":
        attention = "flex_attention" if packed else "sdpa"
    budget = training.get("micro_batch_tokens", "auto")
    if not isinstance(budget, int):
        budget = AUTO_PACKED_ROWS * seq_len if packed else None
    return {
        "packed": packed,
        "attention": attention,
        "fused_loss": training.get("liger") is True and not classification,
        "micro_batch_tokens": budget,
    }


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
