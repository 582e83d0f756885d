"""DPO with TRL on the tiny random Llama in 4-bit, on the CPU: preference pairs, the policy
and its reference (one base, never two), what a run learns and reports, pause and resume,
and the pitfalls: a reference equal to the policy by accident, a loss of 0, padding."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.config import DEFAULT_CHAT_TEMPLATE, Settings
from app.models import Checkpoint, File, Job, JobEvent, Team
from app.schemas import JobCreate
from app.services.files import store_upload
from app.services.jobs import create_job, pause_job, resume_job
from app.services.teams import create_team
from app.storage import ObjectStore
from worker import job_training
from worker.job_hooks import JobHooks
from worker.job_runner import run_job
from worker.training import dpo
from worker.training.data import IGNORE_INDEX, chat_prompt, tokenize_chat
from worker.training.preference import load_preferences, tokenize_pair
from worker.training.qlora_model import load_quantized_base
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

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
# 40 pairs and 10 held-out ones: "8 + 6 = 14." preferred over "The answer is 14, I think!".
TRAIN = DATA / "sample_preference.jsonl"
VALID = DATA / "sample_preference_valid.jsonl"
REWARD_KEYS = {"reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected"}


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


def pair(question: str, preferred: str, rejected: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def first_lines(path: Path, source: Path, n: int) -> Path:
    path.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return path


def make_spec(tiny_model: Path, tmp_path: Path, **changes) -> TrainingSpec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = TrainingSpec(
        base_model_path=tiny_model,
        chat_template=None,  # the tiny model's tokenizer carries DEFAULT_CHAT_TEMPLATE
        data_format="preference",
        train_file=TRAIN,
        valid_file=VALID,
        output_dir=tmp_path / "run",
        n_epochs=1,
        batch_size=8,
        learning_rate=1e-2,
        max_seq_length=256,
        seed=0,
        device="cpu",
        method="dpo",
        lora=LoraSpec(dropout=0.0),
        options=TrainingOptions(sample_max_new_tokens=0),
    )
    return dataclasses.replace(spec, **changes)


def make_parent_adapter(tiny_model: Path, target: Path) -> Path:
    """An adapter far from the base (B drawn at random, not zero), standing in for an SFT
    job's: a reference that were the bare base would disagree with it at once."""
    base = load_quantized_base(tiny_model, QuantSpec(), "cpu")
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(1)
    get_peft_model(base, config).save_pretrained(target)
    return target


def capture_trainer(monkeypatch: pytest.MonkeyPatch, *, force_base_reference: bool = False):
    """Keep the run's PreferenceTrainer for inspection; with force_base_reference, build it
    as if there were no parent: the control whose reference is the bare base."""
    captured: list[dpo.PreferenceTrainer] = []
    build = dpo.preference_trainer

    def capturing(*args, reference_is_parent: bool, **kwargs):
        trainer = build(
            *args, reference_is_parent=reference_is_parent and not force_base_reference, **kwargs
        )
        captured.append(trainer)
        return trainer

    monkeypatch.setattr(dpo, "preference_trainer", capturing)
    return captured


# --- preference pairs -------------------------------------------------------------------


def test_a_pair_is_tokenized_like_the_supervised_assistant_turn(tokenizer: ByT5Tokenizer) -> None:
    record = pair("What is 2 + 2?", "2 + 2 = 4.", "The answer is 4, I think!")
    ids = tokenize_pair(record, tokenizer)

    chat = tokenize_chat(
        {"messages": record["input"]["messages"] + record["preferred_output"]}, tokenizer
    )
    assert ids["prompt_ids"] + ids["chosen_ids"] == chat["input_ids"]
    trained = [
        i
        for i, label in zip(chat["input_ids"], chat["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert ids["chosen_ids"] == trained, "the reply is exactly what SFT trains on"
    assert tokenizer.decode(ids["prompt_ids"]) == chat_prompt(
        record["input"]["messages"], tokenizer
    )
    assert tokenizer.decode(ids["rejected_ids"]) == "The answer is 4, I think!</s>"


def test_pairs_past_max_seq_length_are_cut_dropped_and_counted(
    tmp_path: Path, tokenizer: ByT5Tokenizer
) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            pair("Hi?", "Yes.", "No."),
            pair("Hi?", "Y" * 40, "No."),  # the chosen sequence runs past 32
            pair("Q" * 40, "Yes.", "No."),  # the prompt alone fills 32: nothing left to train
        ],
    )

    cut = load_preferences(path, tokenizer, 32)

    assert [p["line"] for p in cut.examples] == [1, 2]
    long = cut.examples[1]
    assert len(long["prompt_ids"]) + len(long["chosen_ids"]) == 32
    assert cut.counts.truncated == 2 and cut.counts.dropped == 1
    dropped = tokenize_pair(pair("Q" * 40, "Yes.", "No."), tokenizer)
    assert cut.counts.longest == len(dropped["prompt_ids"]) + len(dropped["chosen_ids"])
    assert cut.counts.examples == 2
    assert cut.counts.tokens == sum(
        2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
        for p in cut.examples
    ), "both sequences of a pair, after the cut"
    assert cut.counts.trained_tokens == sum(
        len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in cut.examples
    )

    with pytest.raises(TrainingDataError, match="lines 2, 3") as refused:
        load_preferences(path, tokenizer, 32, truncation="refuse")
    assert refused.value.code == "examples_too_long"


def test_a_dpo_job_refuses_a_chat_file(tiny_model: Path, tmp_path: Path) -> None:
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
    )
    spec = make_spec(tiny_model, tmp_path, data_format="chat", train_file=chat, valid_file=None)

    with pytest.raises(TrainingDataError) as refused:
        run_training(spec, TrainingHooks())
    assert refused.value.code == "unsupported_format_for_method"


# --- training ---------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_learns_the_preferred_style_and_saves_a_loadable_adapter(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainers = capture_trainer(monkeypatch)
    reports: dict[str, dict] = {}

    result = run_training(
        make_spec(tiny_model, tmp_path, options=TrainingOptions(eval_steps=5)),
        TrainingHooks(on_report=lambda kind, message, data: reports.setdefault(kind, data)),
    )

    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all({f"train_{k}" for k in REWARD_KEYS} <= set(r) for r in rows)
    # A fresh adapter starts as the base (B = 0), and the base is the reference: the pairs
    # start tied (loss log 2, rewards 0); from there the loss is never 0, as it would be
    # if 4-bit rounding made the policy's and the reference's log-probabilities diverge.
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["train_rewards_chosen"] == rows[0]["train_rewards_rejected"] == 0
    assert all(0 < r["train_loss"] < math.log(2) for r in rows[1:])
    last = rows[-1]
    assert last["valid_reward_accuracy"] > 0.5 and last["valid_reward_margin"] > 0
    assert last["valid_rewards_chosen"] > last["valid_rewards_rejected"]
    assert last["valid_loss"] < math.log(2)

    assert reports["tokens"]["train"]["examples"] == 40
    assert reports["tokens"]["valid"]["examples"] == 10
    assert 0 < reports["model"]["trainable_parameters"] < reports["model"]["total_parameters"]
    assert reports["throughput"]["tokens"] == result.trained_tokens
    assert result.trained_tokens == reports["tokens"]["train"]["tokens"], "both sequences"

    # One base: no reference model, no second adapter; the reference is the adapter off.
    [trainer] = trainers
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7, "the tiny Llama's 7 linear layers per block, once"
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)

    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    with torch.no_grad():
        assert tuned(input_ids=torch.tensor([[10, 20, 30]])).logits.shape == (1, 3, 384)


@pytest.mark.slow
def test_a_parent_adapter_is_the_policys_start_and_its_reference(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = make_parent_adapter(tiny_model, tmp_path / "parent")
    # 8 pairs, batch 8: one step; its loss is computed before the update.
    train = first_lines(tmp_path / "train.jsonl", TRAIN, 8)

    def first_row(name: str) -> dict:
        spec = make_spec(
            tiny_model, tmp_path / name, train_file=train, valid_file=None, parent_adapter=parent
        )
        [row] = run_training(spec, TrainingHooks()).metrics
        return row

    trainers = capture_trainer(monkeypatch)
    row = first_row("reference-is-parent")
    # Policy and reference start equal only if the reference really is the parent.
    assert row["train_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert row["train_rewards_chosen"] == pytest.approx(0, abs=1e-4)
    assert row["train_rewards_rejected"] == pytest.approx(0, abs=1e-4)
    [trainer] = trainers
    assert sorted(trainer.model.peft_config) == ["default", dpo.REFERENCE_ADAPTER]
    assert trainer.ref_model is None
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7, "two adapters on one 4-bit base"
    reference = {name: p for name, p in trainer.model.named_parameters() if ".ref." in name}
    assert reference and not any(p.requires_grad for p in reference.values())

    monkeypatch.undo()
    capture_trainer(monkeypatch, force_base_reference=True)
    control = first_row("reference-is-base")
    # The same start against the bare base: the parent's adapter already moved the
    # log-probabilities, so the pairs are not tied.
    assert abs(control["train_loss"] - math.log(2)) > 10 * 1e-3
    assert abs(control["train_rewards_chosen"]) > 1e-2


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same(tiny_model: Path, tmp_path: Path) -> None:
    # A GPU's default. TRL switches it off around each reference forward (no gradients
    # there) and back on: the policy's steps must not notice.
    train = first_lines(tmp_path / "train.jsonl", TRAIN, 16)

    def losses(checkpointing: bool) -> list[float]:
        options = TrainingOptions(gradient_checkpointing=checkpointing, sample_max_new_tokens=0)
        spec = make_spec(
            tiny_model,
            tmp_path / str(checkpointing),
            train_file=train,
            valid_file=None,
            options=options,
        )
        return [r["train_loss"] for r in run_training(spec, TrainingHooks()).metrics]

    plain = losses(False)
    assert len(plain) == 2 and plain[1] < plain[0]
    assert losses(True) == pytest.approx(plain, abs=1e-6)


@pytest.mark.slow
def test_a_pair_scores_the_same_alone_and_padded_in_a_batch(
    tiny_model: Path, tmp_path: Path, tokenizer: ByT5Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainers = capture_trainer(monkeypatch)
    short = pair("Hi?", "Yes.", "No.")
    long = pair("What is the capital of France, please?", "Paris, of course.", "Rome.")
    train = write_jsonl(tmp_path / "train.jsonl", [short, long])
    spec = make_spec(
        tiny_model, tmp_path, train_file=train, valid_file=None, batch_size=2, learning_rate=0
    )
    run_training(spec, TrainingHooks())
    [trainer] = trainers
    # Left padding would shift the short pair's positions; TRL pads on the right whatever
    # the tokenizer says.
    trainer.processing_class.padding_side = "left"
    model = trainer.model
    model.eval()

    def log_probs(records: list[dict]) -> torch.Tensor:
        batch = trainer.data_collator([tokenize_pair(r, tokenizer) for r in records])
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)
        return torch.stack([chosen, rejected], dim=1)

    together = log_probs([short, long])
    assert together.shape == (2, 2)
    alone = torch.cat([log_probs([short]), log_probs([long])])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_a_paused_dpo_run_from_a_parent_resumes_where_it_stopped(
    tiny_model: Path, tmp_path: Path
) -> None:
    # 24 pairs / 8 = 3 steps. Paused after step 2, the resumed run needs the parent again
    # (the reference) and the checkpoint (the trained adapter, optimizer, data position).
    parent = make_parent_adapter(tiny_model, tmp_path / "parent")
    train = first_lines(tmp_path / "train.jsonl", TRAIN, 24)
    valid = first_lines(tmp_path / "valid.jsonl", VALID, 4)

    def spec(name: str, **changes) -> TrainingSpec:
        return make_spec(
            tiny_model,
            tmp_path / name,
            train_file=train,
            valid_file=valid,
            parent_adapter=parent,
            options=TrainingOptions(eval_steps=1, sample_max_new_tokens=0),
            **changes,
        )

    full = run_training(spec("full"), TrainingHooks())

    checkpoints: list[tuple[int, Path, dict]] = []
    polls = 0

    def pause_at_step_2() -> str | None:
        nonlocal polls
        polls += 1
        return "pause" if polls >= 2 else None

    def keep(step: int, path: Path, metrics: dict) -> None:
        # Its files only, as the job's tarball holds them (TRL's "ref" copy of the adapter,
        # saved in a subdirectory, is left out: the resumed run makes it from the parent).
        flat = shutil.copytree(
            path,
            tmp_path / "ckpt" / path.name,
            ignore=lambda folder, names: [n for n in names if (Path(folder) / n).is_dir()],
        )
        checkpoints.append((step, flat, metrics))

    paused = run_training(
        spec("paused"), TrainingHooks(should_stop=pause_at_step_2, on_checkpoint=keep)
    )
    assert paused.stopped and paused.step == 2
    [(step, checkpoint, metrics)] = checkpoints
    assert step == 2 and {"train_reward_accuracy", "valid_reward_margin"} <= set(metrics)
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= {
        p.name for p in checkpoint.iterdir()
    }

    resumed = run_training(spec("resumed", resume_from=checkpoint), TrainingHooks())
    assert not resumed.stopped and resumed.step == 3
    assert [r["step"] for r in resumed.metrics] == [3]

    def figures(rows: list[dict]) -> list[float]:
        keys = ("train_loss", "valid_loss", "train_reward_margin", "valid_reward_accuracy")
        return [r[k] for r in rows for k in keys]

    assert figures(paused.metrics + resumed.metrics) == pytest.approx(
        figures(full.metrics), abs=1e-4
    )
    trained = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert set(trained) == set(load_file(parent / "adapter_model.safetensors"))


# --- memory -----------------------------------------------------------------------------

PEAK_MEMORY = """
import json, sys
from pathlib import Path
from worker.training.run import run_training
from worker.training.spec import TrainingHooks, TrainingOptions, TrainingSpec
model, train, out, method = sys.argv[1:]
spec = TrainingSpec(
    base_model_path=Path(model), chat_template=None,
    data_format="preference" if method == "dpo" else "chat",
    train_file=Path(train), valid_file=None, output_dir=Path(out), n_epochs=1, batch_size=8,
    learning_rate=1e-3, max_seq_length=256, seed=0, device="cpu", method=method,
    options=TrainingOptions(sample_max_new_tokens=0),
)
print(json.dumps(run_training(spec, TrainingHooks()).reports["throughput"]))
"""


@pytest.mark.slow
def test_a_dpo_run_peaks_within_a_third_more_memory_than_sft_on_the_same_data(
    tiny_model: Path, tmp_path: Path
) -> None:
    # The same conversations: SFT on prompt + preferred answer, DPO on the pairs. Each run
    # in its own process, whose peak resident memory is the run's alone.
    chats = [
        {"messages": record["input"]["messages"] + record["preferred_output"]}
        for record in map(json.loads, TRAIN.read_text().splitlines())
    ]
    sft_file = write_jsonl(tmp_path / "chat.jsonl", chats)

    def peak_gb(method: str, train: Path) -> float:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK_MEMORY,
                str(tiny_model),
                str(train),
                str(tmp_path / method),
                method,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        assert figures["peak_memory_source"] == "process_max_rss"
        return figures["peak_memory_gb"]

    sft, preference = peak_gb("supervised", sft_file), peak_gb("dpo", TRAIN)
    assert preference <= 1.3 * sft, (preference, sft)


# --- a job: SFT, then DPO on its model, through the job runner on PostgreSQL and S3 -------


@pytest.mark.slow
def test_a_dpo_job_on_an_sft_jobs_model_pauses_resumes_and_publishes_rewards(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    def upload(session: Session, team: Team, path: Path) -> str:
        data = io.BytesIO(path.read_bytes())
        return store_upload(
            session, store, team, path.name, "fine-tune", data, settings.max_file_bytes
        ).id

    with sessions() as session:
        team, _ = create_team(session, "dpo")
        chats = upload(session, team, DATA / "sample_chat_valid.jsonl")
        sft = create_job(
            session,
            settings,
            team,
            JobCreate(
                model="tiny-random-llama",
                training_file=chats,
                hyperparameters={"n_epochs": 1, "batch_size": 2},
                seed=0,
            ),
        )
    assert run_job(sft.id, settings) == "succeeded"

    with sessions() as session:
        team = session.scalar(select(Team).where(Team.name == "dpo"))
        parent_model = session.scalar(select(Job.fine_tuned_model).where(Job.id == sft.id))
        method = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}}
        job = create_job(
            session,
            settings,
            team,
            JobCreate(
                model=parent_model,
                training_file=upload(session, team, TRAIN),
                validation_file=upload(session, team, VALID),
                method=method,
                seed=0,
            ),
        )
    assert (job.method, job.parent["archive"]) == ("dpo", "adapter")

    # Paused once step 2 is reported (40 pairs / 8: 5 steps): the loop sees it after step 3
    # and checkpoints it; resumed, it trains steps 4 and 5.
    class PausingHooks(JobHooks):
        def on_metrics(self, row: dict) -> None:
            super().on_metrics(row)
            if row["step"] == 2:
                with self.sessions() as session:
                    pause_job(session, session.get_one(Team, self.job.team_pk), self.job.id)

    monkeypatch.setattr(job_training, "JobHooks", PausingHooks)
    assert run_job(job.id, settings) == "paused"
    monkeypatch.undo()
    with sessions() as session:
        resume_job(session, settings, session.get_one(Team, job.team_pk), job.id)
    assert run_job(job.id, settings) == "succeeded"

    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job.id))
        timeline = list(
            session.scalars(select(JobEvent).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk))
        )
        rows = [e.data for e in timeline if e.type == "metrics"]
        checkpoints = list(
            session.scalars(
                select(Checkpoint)
                .where(Checkpoint.job_pk == job.pk)
                .order_by(Checkpoint.step_number)
            )
        )
        results = {
            f.filename: f.storage_key
            for f in session.scalars(select(File).where(File.id.in_(job.result_files)))
        }

    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    from_parent = [e for e in timeline if e.message.startswith("Starting from the parent")]
    assert len(from_parent) == 2, "each attempt fetched the parent, the reference"
    # The SFT model is both the policy's start and the reference (fetched again for the
    # resumed attempt): the pairs start tied.
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["train_reward_margin"] == pytest.approx(0, abs=1e-4)
    assert rows[-1]["valid_reward_accuracy"] > 0.5 and rows[-1]["valid_reward_margin"] > 0
    assert [c.step_number for c in checkpoints] == [3, 5]
    first_held_out = json.loads(VALID.read_text().splitlines()[0])
    assert job.stats["sample"]["expected"] == first_held_out["preferred_output"][0]["content"]
    assert {"train_reward_accuracy", "valid_reward_margin"} <= set(checkpoints[-1].metrics)

    store.get_file(results["metrics.csv"], tmp_path / "metrics.csv")
    with open(tmp_path / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in csv_rows] == [1, 2, 3, 4, 5], "both attempts' rows"
    assert float(csv_rows[-1]["valid_reward_accuracy"]) == rows[-1]["valid_reward_accuracy"]
    assert csv_rows[0]["valid_accuracy"] == "", "a classifier's column stays empty"

    store.get_file(results["adapter.tar.gz"], tmp_path / "adapter.tar.gz")
    with tarfile.open(tmp_path / "adapter.tar.gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    base = AutoModelForCausalLM.from_pretrained(settings.models_dir / "tiny-random-llama")
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert tuned(input_ids=torch.tensor([[10, 20, 30]])).logits.shape == (1, 3, 384)


@pytest.mark.slow
def test_a_parent_adapter_gone_from_storage_fails_the_job_with_its_own_code(
    settings: Settings, sessions: sessionmaker[Session], store: ObjectStore
) -> None:
    """An operator's cleanup took the parent's adapter: the job fails saying which model is
    gone, with its own code, and never shows where storage kept it."""
    with sessions() as session:
        team, _ = create_team(session, "orphan")
        chats = store_upload(
            session,
            store,
            team,
            "chat.jsonl",
            "fine-tune",
            io.BytesIO((DATA / "sample_chat_valid.jsonl").read_bytes()),
            settings.max_file_bytes,
        ).id
        body = {"training_file": chats, "hyperparameters": {"n_epochs": 1, "batch_size": 2}}
        sft = create_job(session, settings, team, JobCreate(model="tiny-random-llama", **body))
    assert run_job(sft.id, settings) == "succeeded"
    with sessions() as session:
        team = session.scalar(select(Team).where(Team.name == "orphan"))
        parent_model = session.scalar(select(Job.fine_tuned_model).where(Job.id == sft.id))
        child = create_job(session, settings, team, JobCreate(model=parent_model, **body))
        key = child.parent["storage_key"]
    store.delete(key)

    assert run_job(child.id, settings) == "failed"
    with sessions() as session:
        error = session.scalar(select(Job.error).where(Job.id == child.id))
    assert error["code"] == "parent_model_unavailable"
    assert parent_model in error["message"] and key not in error["message"]
