"""Real 4-bit QLoRA on the tiny random Llama, on the CPU: data masks, the model, the run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, ByT5Tokenizer

from app.config import DEFAULT_CHAT_TEMPLATE
from worker.training.data import (
    IGNORE_INDEX,
    class_names,
    load_examples,
    load_tokenizer,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_text,
)
from worker.training.run import run_training
from worker.training.spec import (
    LoraSpec,
    TrainingDataError,
    TrainingHooks,
    TrainingOptions,
    TrainingSpec,
)
from worker.training.tiny_model import ensure_tiny_random_llama

# What a checkpoint directory (and so its tarball) holds: the adapter, at the root, and
# what Trainer.train(resume_from_checkpoint=...) restores.
CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
)

QUESTIONS = [
    ("Say hi.", "Hi!"),
    ("What colour is the sky?", "Blue."),
    ("What is 2 + 2?", "4."),
    ("Name a fruit.", "Apple."),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_chat_jsonl(path: Path, repeats: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeats):
            for question, answer in QUESTIONS:
                messages = [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_random_llama(
        tmp_path_factory.mktemp("models") / "tiny-random-llama", DEFAULT_CHAT_TEMPLATE
    )


@pytest.fixture
def tokenizer() -> ByT5Tokenizer:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def make_spec(tiny_model: Path, tmp_path: Path, *, valid: bool, n_epochs: int) -> TrainingSpec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return TrainingSpec(
        base_model_path=tiny_model,
        chat_template=None,  # the tiny model's tokenizer carries DEFAULT_CHAT_TEMPLATE
        data_format="chat",
        train_file=write_chat_jsonl(tmp_path / "train.jsonl", repeats=8),
        valid_file=write_chat_jsonl(tmp_path / "valid.jsonl", repeats=1) if valid else None,
        output_dir=tmp_path / "run",
        n_epochs=n_epochs,
        batch_size=8,
        learning_rate=1e-2,
        max_seq_length=256,
        seed=0,
        device="cpu",
        options=TrainingOptions(eval_steps=1),  # a validation loss on every row
    )


# --- the tiny model ---------------------------------------------------------------------


def test_tiny_model_generation_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    again = ensure_tiny_random_llama(tmp_path / "again", DEFAULT_CHAT_TEMPLATE)

    assert sha256(again / "model.safetensors") == sha256(tiny_model / "model.safetensors")
    assert not list(tiny_model.glob("*.bin")), "weights are safetensors only"


def test_tiny_model_survives_concurrent_generation(tmp_path: Path, tiny_model: Path) -> None:
    target = tmp_path / "shared"
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_random_llama(target, "x"), range(2)))

    assert paths == [target, target]
    assert sha256(target / "model.safetensors") == sha256(tiny_model / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["shared"], "no staging dir left behind"


def test_tiny_model_is_not_regenerated_when_present(tiny_model: Path) -> None:
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns

    ensure_tiny_random_llama(tiny_model, DEFAULT_CHAT_TEMPLATE)

    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before


# --- data: loss masks -------------------------------------------------------------------


def test_prompt_completion_trains_only_on_completion_and_eos(tokenizer: ByT5Tokenizer) -> None:
    example = tokenize_prompt_completion({"prompt": "Q: 2+2\nA:", "completion": " 4"}, tokenizer)

    prompt_len = len("Q: 2+2\nA:")  # one token per byte
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert tokenizer.decode(example["labels"][prompt_len:]) == " 4</s>"


def test_chat_trains_only_on_assistant_turns(tokenizer: ByT5Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    example = tokenize_chat({"messages": messages}, tokenizer)

    pairs = zip(example["input_ids"], example["labels"], strict=True)
    trained = [token for token, label in pairs if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello!</s>4</s>"
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_examples_truncated_to_nothing_trainable_are_dropped(
    tmp_path: Path, tokenizer: ByT5Tokenizer
) -> None:
    path = write_chat_jsonl(tmp_path / "train.jsonl", repeats=1)

    kept = load_examples(path, "chat", tokenizer, max_seq_length=32)
    # "<|user|>\nWhat colour is the sky?<|assistant|>\n" is longer than 32 bytes.
    assert 0 < len(kept.examples) < len(QUESTIONS)
    assert all(len(e["input_ids"]) <= 32 for e in kept.examples)
    assert kept.counts.examples == len(kept.examples)
    assert kept.counts.dropped == len(QUESTIONS) - len(kept.examples)
    assert kept.counts.truncated >= kept.counts.dropped


def test_text_trains_on_everything_but_the_first_token(tokenizer: ByT5Tokenizer) -> None:
    example = tokenize_text({"text": "abc"}, tokenizer)

    # ByT5 has no BOS: the labels are the input itself, end-of-sequence included.
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == "abc</s>"


def test_train_on_inputs_puts_the_loss_on_prompts_too(tokenizer: ByT5Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    chat = tokenize_chat({"messages": messages}, tokenizer, train_on_inputs=True)
    pc = tokenize_prompt_completion(
        {"prompt": "Q: 2+2\nA:", "completion": " 4"}, tokenizer, train_on_inputs=True
    )

    assert chat["labels"] == chat["input_ids"]
    assert pc["labels"] == pc["input_ids"]
    # Off (the default) the same conversation trains on the assistant turn only.
    default = tokenize_chat({"messages": messages}, tokenizer)
    assert sum(label != IGNORE_INDEX for label in default["labels"]) == len("Hello!") + 1


def test_classification_examples_carry_one_class_index(
    tmp_path: Path, tokenizer: ByT5Tokenizer
) -> None:
    path = tmp_path / "cls.jsonl"
    rows = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    classes = class_names(path)
    tokenized = load_examples(path, "classification", tokenizer, 64, classes=classes)

    assert classes == ["neg", "pos"]
    assert [e["labels"] for e in tokenized.examples] == [1, 0]
    assert tokenizer.decode(tokenized.examples[0]["input_ids"]) == "great</s>"
    assert tokenized.counts.trained_tokens == 0 and tokenized.counts.examples == 2

    unknown = tmp_path / "valid.jsonl"
    unknown.write_text('{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(TrainingDataError, match="line 1: label 'neutral' does not occur"):
        load_examples(unknown, "classification", tokenizer, 64, classes=classes)


def test_one_label_is_not_a_classifier(tmp_path: Path) -> None:
    path = tmp_path / "cls.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(TrainingDataError) as refused:
        class_names(path)
    assert refused.value.code == "too_few_classes" and "'x'" in str(refused.value)


def test_lines_split_as_the_upload_validator_splits_them(
    tmp_path: Path, tokenizer: ByT5Tokenizer
) -> None:
    # "\r" is JSON whitespace inside a line (the validator accepted it), not a line end.
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text":\r"first"}\n\n{"text": "' + b"x" * 40 + b'"}\n')
    with pytest.raises(TrainingDataError, match="lines 3"):
        load_examples(path, "text", tokenizer, max_seq_length=20, truncation="refuse")


def test_refused_truncation_names_the_lines(tmp_path: Path, tokenizer: ByT5Tokenizer) -> None:
    path = tmp_path / "train.jsonl"
    texts = ["short", "x" * 100, "fine", "y" * 200]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    cut = load_examples(path, "text", tokenizer, max_seq_length=50)
    assert cut.counts.truncated == 2 and cut.counts.longest == 201
    assert cut.counts.tokens == 6 + 50 + 5 + 50
    with pytest.raises(TrainingDataError) as refused:
        load_examples(path, "text", tokenizer, max_seq_length=50, truncation="refuse")
    assert refused.value.code == "examples_too_long"
    assert "2 examples are longer than max_seq_length (50 tokens" in str(refused.value)
    assert "lines 2, 4" in str(refused.value)


# --- the run ----------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_loss_and_saves_a_loadable_adapter(
    tiny_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(tiny_model, tmp_path, valid=True, n_epochs=3)
    rows: list[dict] = []
    checkpoints: list[tuple[int, list[str], dict]] = []

    def on_checkpoint(step: int, path: Path, metrics: dict) -> None:
        # The directory is only there during the call: the Trainer rotates it out later.
        checkpoints.append((step, sorted(p.name for p in path.iterdir()), metrics))

    hooks = TrainingHooks(on_metrics=rows.append, on_checkpoint=on_checkpoint)

    result = run_training(spec, hooks)

    assert not result.stopped
    assert result.metrics == rows
    assert [r["step"] for r in rows] == list(range(1, 13)), "one row per step: 32 / 8 x 3"
    assert all(isinstance(r["train_loss"], float) for r in rows)
    assert all(isinstance(r["valid_loss"], float) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["valid_loss"] < rows[0]["valid_loss"]
    assert rows[-1]["total_steps"] == 12

    assert [step for step, _, _ in checkpoints] == [4, 8, 12]
    for step, files, metrics in checkpoints:
        assert set(CHECKPOINT_FILES) <= set(files)
        assert metrics["step"] == step and "valid_loss" in metrics

    tokenizer = load_tokenizer(tiny_model, chat_template=None)
    examples = load_examples(spec.train_file, "chat", tokenizer, spec.max_seq_length).examples
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    assert result.trained_tokens == 3 * tokens_per_epoch

    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    with torch.no_grad():
        logits = tuned(input_ids=torch.tensor([[10, 20, 30]])).logits
    assert logits.shape == (1, 3, 384)


@pytest.mark.slow
def test_should_stop_ends_training_early(tiny_model: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_model, tmp_path, valid=False, n_epochs=3)
    polls = 0
    checkpoints: list[int] = []

    def should_stop() -> str | None:
        nonlocal polls
        polls += 1
        return "cancel" if polls >= 2 else None

    result = run_training(
        spec,
        TrainingHooks(
            should_stop=should_stop,
            on_checkpoint=lambda step, path, metrics: checkpoints.append(step),
        ),
    )

    assert result.stopped
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert all("valid_loss" not in r for r in result.metrics)
    assert checkpoints == [], "a cancel saves no checkpoint"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_paused_run_resumes_from_its_checkpoint_where_it_stopped(
    tiny_model: Path, tmp_path: Path
) -> None:
    # 32 examples / 8 = 4 steps an epoch, 2 epochs. The pause lands mid-epoch, so the
    # resumed run must also skip the batches of epoch 0 already trained on.
    def spec(name: str, **changes) -> TrainingSpec:
        return dataclasses.replace(
            make_spec(tiny_model, tmp_path / name, valid=True, n_epochs=2), **changes
        )

    def copy_checkpoints(into: list[tuple[int, Path, dict]], root: Path):
        def on_checkpoint(step: int, path: Path, metrics: dict) -> None:
            into.append((step, shutil.copytree(path, root / path.name), metrics))

        return on_checkpoint

    full_checkpoints: list[tuple[int, Path, dict]] = []
    full = run_training(
        spec("full", checkpoint_steps=3),
        TrainingHooks(on_checkpoint=copy_checkpoints(full_checkpoints, tmp_path / "full-ckpt")),
    )
    assert [step for step, _, _ in full_checkpoints] == [3, 4, 6, 8], "every 3 + epoch ends"

    paused_checkpoints: list[tuple[int, Path, dict]] = []
    polls = 0

    def pause_at_step_3() -> str | None:
        nonlocal polls
        polls += 1
        return "pause" if polls >= 3 else None

    paused = run_training(
        spec("paused"),
        TrainingHooks(
            should_stop=pause_at_step_3,
            on_checkpoint=copy_checkpoints(paused_checkpoints, tmp_path / "paused-ckpt"),
        ),
    )

    assert paused.stopped and paused.step == 3
    assert [r["step"] for r in paused.metrics] == [1, 2, 3]
    [(step, checkpoint, metrics)] = paused_checkpoints
    assert step == 3
    assert metrics["step"] == 3 and "valid_loss" in metrics, "the pause step is evaluated"
    assert set(CHECKPOINT_FILES) <= {p.name for p in checkpoint.iterdir()}
    assert [p for p in checkpoint.iterdir() if p.is_dir()] == [], "flat, for the tarball"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3

    messages: list[str] = []
    resumed_checkpoints: list[tuple[int, Path, dict]] = []
    resumed = run_training(
        spec("resumed", resume_from=checkpoint),
        TrainingHooks(
            on_message=messages.append,
            on_checkpoint=copy_checkpoints(resumed_checkpoints, tmp_path / "resumed-ckpt"),
        ),
    )

    assert "Training for 8 steps, continuing after step 3" in messages
    assert not resumed.stopped and resumed.step == 8
    assert [r["step"] for r in resumed.metrics] == [4, 5, 6, 7, 8]
    assert resumed.metrics[-1]["total_steps"] == full.metrics[-1]["total_steps"] == 8
    assert [step for step, _, _ in resumed_checkpoints] == [4, 8]

    def losses(rows: list[dict]) -> list[float]:
        return [loss for r in rows for loss in (r["train_loss"], r["valid_loss"])]

    # Adapter, optimizer, scheduler, RNG and data position all came back: the resumed steps
    # are the uninterrupted run's (on one machine, exactly; other dropout masks alone would
    # move the losses by ~5e-3).
    resumed_losses = losses(paused.metrics + resumed.metrics)
    assert resumed_losses == pytest.approx(losses(full.metrics), abs=1e-4)
    assert resumed.trained_tokens == full.trained_tokens, "tokens seen before the pause count"

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    for adapter in (checkpoint, resumed.adapter_dir):  # a checkpoint is a loadable adapter
        tuned = PeftModel.from_pretrained(base, adapter)
        with torch.no_grad():
            assert tuned(input_ids=torch.tensor([[10, 20, 30]])).logits.shape == (1, 3, 384)
        base = tuned.unload()


@pytest.mark.slow
def test_validation_does_not_change_training(tiny_model: Path, tmp_path: Path) -> None:
    # Guards keep_cpu_weights_trainable: bitsandbytes' CPU inference repacking, triggered by
    # the validation pass, used to cut the gradient through the 4-bit layers. Without
    # dropout, and the same seed, the train losses must not depend on evaluating.
    def train_losses(valid: bool) -> list[float]:
        spec = make_spec(tiny_model, tmp_path / str(valid), valid=valid, n_epochs=1)
        spec = dataclasses.replace(spec, lora=LoraSpec(dropout=0.0))
        return [r["train_loss"] for r in run_training(spec, TrainingHooks()).metrics]

    assert train_losses(valid=True) == train_losses(valid=False)


def test_time_based_checkpoints_follow_the_interval(tiny_model: Path, tmp_path: Path) -> None:
    # An interval of 0 s is always due: every step checkpoints. (None: only epoch ends.)
    steps: list[int] = []
    spec = dataclasses.replace(
        make_spec(tiny_model, tmp_path / "timed", valid=False, n_epochs=1),
        checkpoint_seconds=0.0,
    )
    run_training(spec, TrainingHooks(on_checkpoint=lambda step, path, m: steps.append(step)))
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_run_reports_tokens_parameters_throughput_accuracy_and_a_sample(
    tiny_model: Path, tmp_path: Path
) -> None:
    spec = make_spec(tiny_model, tmp_path, valid=True, n_epochs=2)
    spec = dataclasses.replace(spec, options=TrainingOptions(eval_steps=3, sample_max_new_tokens=8))
    reports: dict[str, tuple[str, dict]] = {}

    result = run_training(
        spec, TrainingHooks(on_report=lambda kind, msg, data: reports.update({kind: (msg, data)}))
    )

    assert list(reports) == ["tokens", "model", "throughput", "sample"]
    assert result.reports == {kind: data for kind, (_, data) in reports.items()}
    message, tokens = reports["tokens"]
    assert tokens["train"]["examples"] == 32 and tokens["valid"]["examples"] == 4
    assert tokens["train"]["tokens"] * 2 == result.trained_tokens
    assert f"{tokens['train']['tokens']:,} tokens per epoch" in message
    _, params = reports["model"]
    assert 0 < params["trainable_parameters"] < params["total_parameters"]
    _, speed = reports["throughput"]
    assert speed["tokens"] == result.trained_tokens and speed["tokens_per_second"] > 0
    assert speed["peak_memory_gb"] > 0 and speed["peak_memory_source"] == "process_max_rss"
    _, sample = reports["sample"]
    assert sample["source"] == "validation" and sample["prompt"] == "Say hi."
    assert sample["expected"] == "Hi!" and isinstance(sample["completion"], str)

    # 8 steps; validation every 3 and at the epoch ends (4, 8), with token accuracy.
    evaluated = [r for r in result.metrics if "valid_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 4, 6, 8]
    assert all(0 <= r["valid_mean_token_accuracy"] <= 1 for r in evaluated)
    assert len(result.metrics) == 8


def test_all_linear_lora_adapts_attention_and_mlp(tiny_model: Path, tmp_path: Path) -> None:
    spec = make_spec(tiny_model, tmp_path, valid=False, n_epochs=1)
    result = run_training(spec, TrainingHooks())

    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in name for name in config["target_modules"])


@pytest.mark.slow
def test_a_classification_job_trains_and_reports_accuracy(tiny_model: Path, tmp_path: Path) -> None:
    # Two classes a byte-level model can tell apart: the first letter of the text.
    def write(path: Path, n: int) -> Path:
        words = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
        with open(path, "w") as f:
            for i in range(n):
                positive = i % 2 == 0
                text = ("yes " if positive else "no ") + words[i % len(words)]
                f.write(json.dumps({"text": text, "label": "pos" if positive else "neg"}) + "\n")
        return path

    spec = dataclasses.replace(
        make_spec(tiny_model, tmp_path, valid=True, n_epochs=6),
        data_format="classification",
        train_file=write(tmp_path / "cls-train.jsonl", 32),
        valid_file=write(tmp_path / "cls-valid.jsonl", 8),
        learning_rate=2e-2,
        options=TrainingOptions(eval_steps=4),
    )
    reports: dict[str, dict] = {}
    checkpoint_classes: list = []  # what each checkpoint says its outputs are

    result = run_training(
        spec,
        TrainingHooks(
            on_report=lambda kind, msg, data: reports.update({kind: data}),
            on_checkpoint=lambda step, path, row: checkpoint_classes.append(
                json.loads((path / "classes.json").read_text())
            ),
        ),
    )

    evaluated = [r for r in result.metrics if "valid_accuracy" in r]
    assert evaluated and evaluated[-1]["step"] == 24
    assert evaluated[-1]["valid_accuracy"] == 1.0, evaluated
    assert evaluated[-1]["valid_loss"] < evaluated[0]["valid_loss"]
    assert all(0 <= r["valid_macro_f1"] <= 1 for r in evaluated)
    assert "sample" not in reports, "no generation sample for a classifier"
    assert reports["tokens"]["classes"] == ["neg", "pos"]
    assert json.loads((result.adapter_dir / "classes.json").read_text()) == ["neg", "pos"]
    assert checkpoint_classes == [["neg", "pos"]] * 6  # one checkpoint per epoch
    report = reports["classification"]
    assert report["step"] == 24 and report["accuracy"] == 1.0
    assert report["confusion_matrix"] == [[4, 0], [0, 4]]
    saved = json.loads((result.adapter_dir / "classification_report.json").read_text())
    assert saved == report
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    tuned.eval()
    tokenizer = load_tokenizer(tiny_model, chat_template=None)
    with torch.no_grad():
        logits = tuned(**tokenizer(["yes kiwi", "no kiwi"], padding=True, return_tensors="pt"))
    assert logits.logits.shape == (2, 2)


def test_padded_batches_count_the_same_real_tokens_as_packed_ones(
    tiny_model: Path, tmp_path: Path
) -> None:
    def run(packing: bool):
        spec = make_spec(tiny_model, tmp_path / str(packing), valid=False, n_epochs=2)
        return run_training(
            dataclasses.replace(spec, options=TrainingOptions(packing=packing)), TrainingHooks()
        )

    packed, padded = run(True), run(False)

    # Padding is not counted as trained tokens: both saw the same real tokens.
    assert packed.trained_tokens == padded.trained_tokens
    assert padded.metrics[-1]["train_loss"] < padded.metrics[0]["train_loss"]
