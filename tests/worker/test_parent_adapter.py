"""Training on from a fine-tuned model: a supervised run given a parent adapter starts from
its weights and LoRA shape, and saves a whole adapter on the base, loadable as any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.training.qlora_model import add_lora, load_quantized_base
from worker.training.run import run_training
from worker.training.spec import (
    LoraSpec,
    QuantSpec,
    TrainingDataError,
    TrainingHooks,
    TrainingOptions,
    TrainingSpec,
)
from worker.training.tiny_model import ensure_tiny_random_llama

CONVERSATIONS = [
    ("Say hi.", "Hi!"),
    ("What colour is the sky?", "Blue."),
    ("What is 2 + 2?", "4."),
    ("Name a fruit.", "Apple."),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


def write_chat(path: Path) -> Path:
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
        for q, a in CONVERSATIONS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_spec(tiny_model: Path, tmp_path: Path, data: Path, **changes) -> TrainingSpec:
    # One batch of all four conversations, one packed row: the step's loss and an
    # evaluation over the same file average the same tokens.
    values = dict(
        base_model_path=tiny_model,
        chat_template=None,
        data_format="chat",
        train_file=data,
        valid_file=data,
        output_dir=tmp_path / "run",
        n_epochs=1,
        batch_size=4,
        learning_rate=1e-2,
        max_seq_length=256,
        seed=0,
        device="cpu",
        lora=LoraSpec(r=4, dropout=0.0),
        options=TrainingOptions(eval_steps=1, sample_max_new_tokens=0),
    )
    return TrainingSpec(**{**values, **changes})


def test_the_parent_adapters_weights_and_config_are_loaded_trainable(
    tiny_model: Path, tmp_path: Path
) -> None:
    base = load_quantized_base(tiny_model, QuantSpec(), "cpu")
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(3)
    get_peft_model(base, config).save_pretrained(tmp_path / "parent")
    saved = load_file(tmp_path / "parent" / "adapter_model.safetensors")

    base = load_quantized_base(tiny_model, QuantSpec(), "cpu")
    child = add_lora(base, LoraSpec(r=8, dropout=0.2), parent=tmp_path / "parent")

    config = child.peft_config["default"]
    assert (config.r, config.lora_alpha) == (2, 4), "the parent's shape, not the job's"
    assert config.lora_dropout == 0.2, "the job's dropout"
    assert not config.inference_mode
    loaded = get_peft_model_state_dict(child)
    assert set(loaded) == set(saved)
    for name, weight in saved.items():
        assert torch.equal(loaded[name].cpu(), weight)
    trainable = [p for p in child.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert sum(p.numel() for p in trainable) == sum(w.numel() for w in saved.values())


def test_a_classifier_adapter_cannot_parent_a_text_job(tiny_model: Path, tmp_path: Path) -> None:
    base = load_quantized_base(tiny_model, QuantSpec(), "cpu")
    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")
    get_peft_model(base, config).save_pretrained(tmp_path / "classifier")

    with pytest.raises(ValueError, match="SEQ_CLS"):
        add_lora(
            load_quantized_base(tiny_model, QuantSpec(), "cpu"),
            LoraSpec(),
            parent=tmp_path / "classifier",
        )


@pytest.mark.slow
def test_a_supervised_run_from_a_parent_continues_it(tiny_model: Path, tmp_path: Path) -> None:
    data = write_chat(tmp_path / "chat.jsonl")
    parent = run_training(
        chat_spec(tiny_model, tmp_path / "parent", data, n_epochs=3), TrainingHooks()
    )
    parent_loss = parent.metrics[-1]["valid_loss"]  # the parent's final model, on the file

    reports: dict[str, dict] = {}
    child = run_training(
        chat_spec(tiny_model, tmp_path / "child", data, parent_adapter=parent.adapter_dir),
        TrainingHooks(on_report=lambda kind, message, data: reports.setdefault(kind, data)),
    )
    fresh = run_training(chat_spec(tiny_model, tmp_path / "fresh", data), TrainingHooks())

    # The child's first step is measured before its update: on the parent's weights.
    assert child.metrics[0]["train_loss"] == pytest.approx(parent_loss, abs=1e-4)
    assert abs(fresh.metrics[0]["train_loss"] - parent_loss) > 0.1, "not the base's loss"
    assert child.metrics[-1]["valid_loss"] < parent_loss, "and trains on from there"

    # A whole adapter on the base (not a delta on the parent's), the parent's shape.
    saved = load_file(child.adapter_dir / "adapter_model.safetensors")
    parent_weights = load_file(parent.adapter_dir / "adapter_model.safetensors")
    assert set(saved) == set(parent_weights)
    assert any(not torch.equal(saved[k], parent_weights[k]) for k in saved)
    assert reports["model"]["trainable_parameters"] == sum(w.numel() for w in saved.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(base, child.adapter_dir)
    assert list(tuned.peft_config) == ["default"]
    with torch.no_grad():
        assert tuned(input_ids=torch.tensor([[10, 20, 30]])).logits.shape == (1, 3, 384)


@pytest.mark.parametrize(
    "labels", [["cat", "dog", "eel"], ["ant", "bee"]], ids=["another count", "other names"]
)
def test_a_classifier_keeps_its_parents_classes(tiny_model: Path, tmp_path: Path, labels) -> None:
    """The parent's head has one output per class of its own file: another set of labels
    would not load (another count) or would silently mean other classes (other names).
    The run refuses before it loads a model, naming both sets."""
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "classes.json").write_text(json.dumps(["cat", "dog"]))
    data = tmp_path / "labels.jsonl"
    rows = [{"text": f"example {i}", "label": labels[i % len(labels)]} for i in range(6)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = chat_spec(
        tiny_model, tmp_path, data, data_format="classification", parent_adapter=parent
    )
    with pytest.raises(TrainingDataError) as info:
        run_training(spec, TrainingHooks())
    assert info.value.code == "classes_mismatch"
    assert "['cat', 'dog']" in str(info.value) and repr(sorted(labels)) in str(info.value)
