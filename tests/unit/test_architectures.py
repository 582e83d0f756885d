"""A base model's kind and default LoRA targets, from config.json as the hub saves it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from app.domain.architectures import (
    ALL_LINEAR,
    ENCODER_TARGETS,
    ENCODER_TYPES,
    ModelKind,
    default_lora_targets,
    kind_from_config,
    linear_layers_per_block,
)

# The fields that decide, as these checkpoints' config.json files hold them.
BERT_BASE_UNCASED = {
    "architectures": ["BertForMaskedLM"],
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "vocab_size": 30522,
}
ROBERTA_BASE = {"architectures": ["RobertaForMaskedLM"], "model_type": "roberta"}
DISTILBERT_BASE = {"architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert"}
DEBERTA_V3_BASE = {"model_type": "deberta-v2"}  # microsoft/deberta-v3-base has no architectures
LLAMA_2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (BERT_BASE_UNCASED, ModelKind.ENCODER),
        (ROBERTA_BASE, ModelKind.ENCODER),
        (DISTILBERT_BASE, ModelKind.ENCODER),
        (DEBERTA_V3_BASE, ModelKind.ENCODER),
        ({"architectures": ["BertForPreTraining"], "model_type": "bert"}, ModelKind.ENCODER),
        ({"architectures": ["BertModel"], "model_type": "bert"}, ModelKind.ENCODER),
        # A fine-tuned BERT classifier is still an encoder.
        (
            {"architectures": ["BertForSequenceClassification"], "model_type": "BERT"},
            ModelKind.ENCODER,
        ),
        (LLAMA_2_7B, ModelKind.CAUSAL),
        (GPT2, ModelKind.CAUSAL),
        # A decoder's classifier checkpoint stays causal: the head alone does not decide.
        (
            {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"},
            ModelKind.CAUSAL,
        ),
        # BERT code configured as a decoder.
        ({"architectures": ["BertLMHeadModel"], "model_type": "bert"}, ModelKind.CAUSAL),
        ({"model_type": "roberta", "is_decoder": True}, ModelKind.CAUSAL),
        # An unknown family with an encoder-only head.
        ({"architectures": ["NewThingForMaskedLM"], "model_type": "newthing"}, ModelKind.ENCODER),
        # Nothing to go by: causal, as every model was before encoders.
        ({}, ModelKind.CAUSAL),
        ({"model_type": "newthing", "architectures": ["NewThingModel"]}, ModelKind.CAUSAL),
        ({"architectures": "BertForMaskedLM"}, ModelKind.ENCODER),  # a string, not a list
    ],
)
def test_the_kind_comes_from_architectures_model_type_and_is_decoder(
    config: dict, kind: ModelKind
) -> None:
    assert kind_from_config(config) is kind


@pytest.mark.parametrize(
    ("kind", "model_type", "targets"),
    [
        (ModelKind.CAUSAL, "llama", [ALL_LINEAR]),
        (ModelKind.CAUSAL, "bert", [ALL_LINEAR]),  # a BERT decoder: no encoder rule
        (ModelKind.ENCODER, "bert", ["query", "value"]),
        (ModelKind.ENCODER, "roberta", ["query", "value"]),
        (ModelKind.ENCODER, "xlm-roberta", ["query", "value"]),
        (ModelKind.ENCODER, "distilbert", ["q_lin", "v_lin"]),
        (ModelKind.ENCODER, "deberta-v2", ["query_proj", "value_proj"]),
        (ModelKind.ENCODER, "deberta", ["in_proj"]),
        (ModelKind.ENCODER, "mpnet", ["q", "v"]),
        (ModelKind.ENCODER, "modernbert", ["Wqkv"]),
        (ModelKind.ENCODER, "funnel", [ALL_LINEAR]),
        (ModelKind.ENCODER, "newthing", [ALL_LINEAR]),
        (ModelKind.ENCODER, None, [ALL_LINEAR]),
        ("encoder", "BERT", ["query", "value"]),
    ],
)
def test_default_lora_targets_by_kind_and_family(
    kind: ModelKind | str, model_type: str | None, targets: list[str]
) -> None:
    assert default_lora_targets(kind, model_type) == targets


def test_the_defaults_are_copies() -> None:
    default_lora_targets(ModelKind.ENCODER, "bert").append("key")
    assert default_lora_targets(ModelKind.ENCODER, "bert") == ["query", "value"]


def test_an_encoder_block_has_fewer_linear_layers_than_a_decoder_block() -> None:
    assert linear_layers_per_block(ModelKind.CAUSAL) == 7
    assert linear_layers_per_block("encoder") == 6


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        default_lora_targets("seq2seq", "t5")


# --- The tables against the installed transformers' own source (read, not imported) ----

TRANSFORMERS = Path(importlib.util.find_spec("transformers").submodule_search_locations[0])
MODULE_DIRS = {"data2vec-text": "data2vec"}  # model types whose package is named otherwise


def family_sources(model_type: str, prefix: str) -> str:
    folder = TRANSFORMERS / "models" / MODULE_DIRS.get(model_type, model_type.replace("-", "_"))
    files = sorted(folder.glob(f"{prefix}_*.py"))
    assert files, f"no {prefix}_*.py for {model_type!r} in {folder}"
    return "\n".join(f.read_text() for f in files)


@pytest.mark.parametrize("model_type", sorted(ENCODER_TYPES))
def test_every_encoder_type_is_spelled_as_transformers_spells_it(model_type: str) -> None:
    source = family_sources(model_type, "configuration")
    assert re.search(rf'model_type = "{re.escape(model_type)}"', source)


@pytest.mark.parametrize(("model_type", "targets"), sorted(ENCODER_TARGETS.items()))
def test_default_targets_are_linear_modules_of_the_family(
    model_type: str, targets: list[str]
) -> None:
    source = family_sources(model_type, "modeling")
    for name in targets:
        assert re.search(rf"self\.{re.escape(name)} = nn\.Linear\(", source), (model_type, name)
