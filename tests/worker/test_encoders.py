"""Encoder classifiers in 4-bit on the CPU: BERT and RoBERTa saved as their hub checkpoints
are (tests/encoders.py), loaded with a new head, trained on the sample news topics."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, BertModel

from tests.encoders import build_tiny_bert, build_tiny_roberta
from worker.training.checkpoint_layout import ReplacedLayer, checkpoint_layout
from worker.training.data import load_tokenizer, read_jsonl
from worker.training.qlora_model import add_lora, load_base_for_training
from worker.training.run import run_training
from worker.training.spec import (
    ALL_LINEAR,
    LoraSpec,
    QuantSpec,
    TrainingDataError,
    TrainingHooks,
    TrainingOptions,
    TrainingResult,
    TrainingSpec,
)

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
TRAIN = DATA / "sample_news.jsonl"  # 160 lines, four topics of 40
VALID = DATA / "sample_news_valid.jsonl"  # 40 lines, ten a topic
CLASSES = ["Business", "Sci/Tech", "Sports", "World"]
CHANCE = 1 / len(CLASSES)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="module")
def bert(models: Path) -> Path:
    return build_tiny_bert(models / "tiny-bert")


@pytest.fixture(scope="module")
def roberta(models: Path) -> Path:
    return build_tiny_roberta(models / "tiny-roberta")


@pytest.fixture(scope="module")
def bert_2_labels(models: Path) -> Path:
    return build_tiny_bert(models / "tiny-bert-2-labels", head_labels=2)


@pytest.fixture(scope="module")
def bert_without_pooler(bert: Path, models: Path) -> Path:
    """The encoder alone, as BertModel saves it: no "bert." prefix, no pooler, no heads."""
    path = models / "tiny-bert-encoder-only"
    BertModel.from_pretrained(bert, add_pooling_layer=False).save_pretrained(path)
    load_tokenizer(bert, chat_template=None).save_pretrained(path)
    return path


def classification_spec(model: Path, tmp_path: Path, **changes) -> TrainingSpec:
    # 20 steps an epoch, 120 in all: the tiny encoders reach 0.75-0.95 on the validation
    # file over seeds; the e2e tests train this way too.
    spec = TrainingSpec(
        base_model_path=model,
        chat_template=None,
        data_format="classification",
        train_file=TRAIN,
        valid_file=VALID,
        output_dir=tmp_path / "run",
        n_epochs=6,
        batch_size=8,
        learning_rate=1e-2,
        max_seq_length=64,
        seed=0,
        device="cpu",
        lora=LoraSpec(target_modules=("query", "value")),
        options=TrainingOptions(eval_steps=40),
    )
    return dataclasses.replace(spec, **changes)


def is_4bit(layer: torch.nn.Module) -> bool:
    return isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state is not None


def is_full_precision(layer: torch.nn.Module) -> bool:
    return type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32


def final_accuracy(result: TrainingResult) -> float:
    return [r for r in result.metrics if "valid_accuracy" in r][-1]["valid_accuracy"]


# --- loading ----------------------------------------------------------------------------


def test_the_layout_names_new_and_replaced_layers_from_the_checkpoint_header(
    bert: Path, roberta: Path, bert_2_labels: Path, bert_without_pooler: Path
) -> None:
    def layout(path: Path):
        config = AutoConfig.from_pretrained(path, num_labels=4)
        return checkpoint_layout(
            path, AutoModelForSequenceClassification, config, classification=True
        )

    pretraining = layout(bert)
    assert (pretraining.head, pretraining.missing, pretraining.replaced) == (
        ["classifier"],
        ["classifier"],
        [],
    )
    # Saved without the "bert." prefix: found all the same, only the pooler is new.
    assert layout(bert_without_pooler).missing == ["bert.pooler.dense", "classifier"]
    assert layout(roberta).missing == ["classifier.dense", "classifier.out_proj"]
    two = layout(bert_2_labels)
    assert two.missing == [] and two.replaced == [ReplacedLayer("classifier", (2, 64), (4, 64))]
    assert set(two.keep_full_precision) >= {"classifier"}


def test_a_checkpoint_of_another_shape_outside_the_head_is_refused(
    bert: Path, tmp_path: Path
) -> None:
    # The weights of one vocabulary, a config.json of another: not a head to replace.
    shutil.copytree(bert, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["vocab_size"] += 1
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="`bert.embeddings.word_embeddings` has shape"):
        load_base_for_training(tmp_path / "model", QuantSpec(), "cpu", classes=CLASSES)


def test_a_bert_base_checkpoint_loads_for_four_classes_with_a_full_precision_head(
    bert: Path,
) -> None:
    messages: list[str] = []

    base = load_base_for_training(
        bert, QuantSpec(), "cpu", classes=CLASSES, on_message=messages.append
    )

    model = base.model
    assert is_full_precision(model.classifier)
    assert model.classifier.out_features == 4
    attention = model.bert.encoder.layer[0].attention.self
    assert is_4bit(attention.query) and is_4bit(attention.value)
    assert is_4bit(model.bert.pooler.dense), "the checkpoint holds the pooler: quantized"
    assert base.new_modules == [] and messages == [], "the new head is peft's to train"
    tokenizer = load_tokenizer(bert, chat_template=None)
    batch = tokenizer(["league scores season", "market shares fall"], padding=True)
    with torch.no_grad():
        logits = model(**batch.convert_to_tensors("pt")).logits
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def test_a_checkpoint_without_a_pooler_trains_a_new_one_in_full_and_saves_it(
    bert_without_pooler: Path, tmp_path: Path
) -> None:
    messages: list[str] = []

    base = load_base_for_training(
        bert_without_pooler, QuantSpec(), "cpu", classes=CLASSES, on_message=messages.append
    )
    model = add_lora(
        base.model,
        LoraSpec(target_modules=("query", "value")),
        classification=True,
        modules_to_save=base.new_modules,
    )

    assert base.new_modules == ["bert.pooler.dense"]
    assert any("no weights for `bert.pooler.dense`" in m for m in messages), messages
    bert = model.base_model.model.bert
    assert is_4bit(bert.encoder.layer[1].attention.self.key), "found without 'bert.'"
    pooler = bert.pooler.dense.modules_to_save["default"]
    assert is_full_precision(pooler) and pooler.weight.requires_grad
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert is_full_precision(head) and head.weight.requires_grad

    # The adapter carries the new pooler: whoever loads it gets the one it trained with.
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(bert_without_pooler, num_labels=4)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded_pooler = loaded.base_model.model.bert.pooler.dense.modules_to_save["default"]
    assert torch.equal(loaded_pooler.weight, pooler.weight)


def test_all_linear_adapts_the_encoder_but_not_the_head_trained_in_full(roberta: Path) -> None:
    base = load_base_for_training(roberta, QuantSpec(), "cpu", classes=CLASSES)
    model = add_lora(base.model, LoraSpec(target_modules=(ALL_LINEAR,)), classification=True)

    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    layer = "base_model.model.roberta.encoder.layer.0"
    assert {f"{layer}.attention.self.query", f"{layer}.output.dense"} <= adapted
    # RoBERTa's head is a module with two linear layers: both trained whole, no adapter.
    assert not [name for name in adapted if ".classifier." in name], adapted
    assert model.base_model.model.classifier.modules_to_save["default"].dense.weight.requires_grad


# --- training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bert_classifier_learns_the_topics_reports_them_and_loads_without_4bit(
    bert: Path, tmp_path: Path
) -> None:
    reports: dict[str, tuple[str, dict]] = {}

    result = run_training(
        classification_spec(bert, tmp_path),
        TrainingHooks(on_report=lambda kind, msg, data: reports.update({kind: (msg, data)})),
    )

    evaluated = [r for r in result.metrics if "valid_accuracy" in r]
    assert [r["step"] for r in evaluated] == [20, 40, 60, 80, 100, 120]
    assert all(0 <= r["valid_macro_f1"] <= 1 for r in evaluated)
    accuracy = final_accuracy(result)
    assert accuracy > 0.5, evaluated
    assert list(reports) == ["tokens", "model", "throughput", "classification"]
    message, report = reports["classification"]
    assert report["step"] == 120 and report["accuracy"] == accuracy
    assert report["macro_f1"] == evaluated[-1]["valid_macro_f1"]
    assert report["classes"] == CLASSES and [c["class"] for c in report["per_class"]] == CLASSES
    assert [c["support"] for c in report["per_class"]] == [10, 10, 10, 10]
    matrix = report["confusion_matrix"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert sum(map(sum, matrix)) == 40
    assert f"accuracy {accuracy:.3f}" in message

    adapter = result.adapter_dir
    assert json.loads((adapter / "classes.json").read_text()) == CLASSES
    assert json.loads((adapter / "classification_report.json").read_text()) == report
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert set(config["target_modules"]) == {"query", "value"}

    # As a user loads it: the base in full precision (no bitsandbytes), the adapter on top.
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=4)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = load_tokenizer(bert, chat_template=None)
    records = [record for _, record in read_jsonl(VALID)]
    batch = tokenizer([r["text"] for r in records], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = tuned(**batch).logits.argmax(-1).tolist()
    right = sum(CLASSES[p] == r["label"] for p, r in zip(predicted, records, strict=True))
    # The 4-bit base it trained on rounds the same weights a little differently.
    assert right / len(records) == pytest.approx(accuracy, abs=0.1)


@pytest.mark.slow
def test_a_roberta_classifier_learns_the_topics(roberta: Path, tmp_path: Path) -> None:
    result = run_training(classification_spec(roberta, tmp_path), TrainingHooks())

    assert final_accuracy(result) > 0.5, result.metrics
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]


@pytest.mark.slow
def test_a_checkpoint_with_a_2_label_head_trains_a_4_class_job_with_a_new_head(
    bert_2_labels: Path, tmp_path: Path
) -> None:
    messages: list[str] = []

    result = run_training(
        classification_spec(bert_2_labels, tmp_path), TrainingHooks(on_message=messages.append)
    )

    assert (
        "The checkpoint's classification head `classifier` has 2 outputs; replaced by a new "
        "head with 4, one per class" in messages
    )
    assert final_accuracy(result) > 0.5, result.metrics


def test_a_cancelled_classifier_has_no_final_report(bert: Path, tmp_path: Path) -> None:
    reports: dict[str, dict] = {}
    polls = 0

    def cancel_after_two_steps() -> str | None:
        nonlocal polls
        polls += 1
        return "cancel" if polls >= 2 else None

    result = run_training(
        classification_spec(bert, tmp_path, options=TrainingOptions(eval_steps=1)),
        TrainingHooks(
            should_stop=cancel_after_two_steps,
            on_report=lambda kind, msg, data: reports.update({kind: data}),
        ),
    )

    assert result.stopped and result.step == 2
    assert "valid_macro_f1" in result.metrics[0], "evaluated before the cancel"
    assert "classification" not in reports
    assert not (result.adapter_dir / "classification_report.json").exists()


@pytest.mark.slow
def test_an_encoder_reads_at_most_its_positions_whatever_max_seq_length_says(
    roberta: Path, tmp_path: Path
) -> None:
    # 600 words: past the 512 tokens RoBERTa's position embeddings hold (an index error).
    rows = [{"text": "market " * 600, "label": "Business"}]
    rows += [{"text": f"league scores {i}", "label": "Sports"} for i in range(7)]
    train = tmp_path / "long.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages: list[str] = []
    reports: dict[str, dict] = {}

    result = run_training(
        classification_spec(
            roberta, tmp_path, train_file=train, valid_file=None, n_epochs=1, max_seq_length=2048
        ),
        TrainingHooks(
            on_message=messages.append,
            on_report=lambda kind, msg, data: reports.update({kind: data}),
        ),
    )

    assert "The base model reads at most 512 tokens: examples are cut to 512, " in " ".join(
        messages
    )
    assert reports["tokens"]["train"]["truncated"] == 1
    assert result.step == 1 and not result.stopped


def test_a_chat_file_on_an_encoder_is_refused_naming_both(bert: Path, tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")

    with pytest.raises(TrainingDataError) as refused:
        run_training(
            classification_spec(bert, tmp_path, data_format="chat", train_file=chat),
            TrainingHooks(),
        )

    assert refused.value.code == "unsupported_format_for_model"
    assert "BertForPreTraining" in str(refused.value) and "'chat'" in str(refused.value)
