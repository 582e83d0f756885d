"""What kind of network a base model is (a causal decoder or an encoder), read from its
config.json, and the rules that follow from the kind: which layers LoRA adapts by default
and how many linear layers a block holds for the memory estimate.

Plain Python over the config.json dict, so the API decides these without importing
transformers or torch, and the worker applies the same rules to the model it loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

ALL_LINEAR = "all-linear"
"""peft's name for every linear layer of the blocks (the output head excluded)."""


class ModelKind(StrEnum):
    CAUSAL = "causal"
    """A decoder trained to predict the next token (Llama, Mistral, GPT-2): it fine-tunes on
    every dataset format; classification puts a head on its last token."""
    ENCODER = "encoder"
    """A bidirectional encoder (BERT, RoBERTa, DeBERTa): it cannot generate text, so it
    fine-tunes classifiers only, a head on its pooled or first-token output."""


# config.json's model_type of encoder-only families, spelled as transformers spells them.
# The value: the attention projections LoRA adapts by default (query and value, as in the
# LoRA paper and peft's own table), named as the family's modeling file names its modules.
# DeBERTa (v1) and ModernBERT fuse query, key and value into one projection, adapted whole.
ENCODER_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "xlm-roberta-xl": ["query", "value"],
    "roberta-prelayernorm": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "ernie": ["query", "value"],
    "megatron-bert": ["query", "value"],
    "data2vec-text": ["query", "value"],
    "layoutlm": ["query", "value"],
    "longformer": ["query", "value"],
    "big_bird": ["query", "value"],
    "roformer": ["query", "value"],
    "mobilebert": ["query", "value"],
    "convbert": ["query", "value"],
    "rembert": ["query", "value"],
    "xmod": ["query", "value"],
    "esm": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],
}

# Encoder families whose attention module names are not in the table above: known to be
# encoders, adapted on all their linear layers by default.
OTHER_ENCODER_TYPES = frozenset({"squeezebert", "ibert", "funnel", "canine", "luke", "splinter"})

ENCODER_TYPES = frozenset(ENCODER_TARGETS) | OTHER_ENCODER_TYPES

# Heads that only a decoder has, and heads that only an encoder has. Classification and
# bare-model heads (…ForSequenceClassification, …Model) exist for both, so for those the
# model_type decides.
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
ENCODER_HEADS = ("ForMaskedLM", "ForPreTraining")

LINEAR_LAYERS_PER_BLOCK: dict[ModelKind, int] = {
    # Llama-style: q, k, v, o in attention; gate, up, down in the MLP.
    ModelKind.CAUSAL: 7,
    # BERT-style: query, key, value and the attention output; intermediate and output.
    ModelKind.ENCODER: 6,
}
"""Linear layers in one block: what "all-linear" adapts, for the memory estimate."""


def _normalise(model_type: str | None) -> str:
    return (model_type or "").strip().lower()


def _architectures(config: Mapping[str, Any]) -> list[str]:
    names = config.get("architectures") or []
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, Iterable) else []


def kind_from_config(config: Mapping[str, Any]) -> ModelKind:
    """The kind of the model a config.json describes; causal when nothing says otherwise.

    In order: `is_decoder: true` (BERT-family code run as a decoder) and a decoder-only head
    in `architectures` make it causal; an encoder `model_type` or an encoder-only head
    (masked LM, pre-training) make it an encoder. Causal is the default because it is what
    Lathe trained before it knew encoders, and a decoder it cannot identify still trains.
    """
    if config.get("is_decoder") is True:
        return ModelKind.CAUSAL
    heads = _architectures(config)
    if any(name.endswith(CAUSAL_HEADS) for name in heads):
        return ModelKind.CAUSAL
    if _normalise(config.get("model_type")) in ENCODER_TYPES:
        return ModelKind.ENCODER
    if any(name.endswith(ENCODER_HEADS) for name in heads):
        return ModelKind.ENCODER
    return ModelKind.CAUSAL


def default_lora_targets(kind: ModelKind | str, model_type: str | None) -> list[str]:
    """The modules LoRA adapts when neither the job nor the deployment names them.

    Decoders: every linear layer, as the QLoRA paper recommends. Encoders: the attention
    query and value projections, the classic LoRA setting for classifiers (and peft's
    default for these families); an encoder family not in the table: every linear layer.
    """
    if ModelKind(kind) is ModelKind.CAUSAL:
        return [ALL_LINEAR]
    return list(ENCODER_TARGETS.get(_normalise(model_type), [ALL_LINEAR]))


def linear_layers_per_block(kind: ModelKind | str) -> int:
    return LINEAR_LAYERS_PER_BLOCK[ModelKind(kind)]
