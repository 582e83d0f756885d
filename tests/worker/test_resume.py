"""Pause and resume through worker.job_runner, on PostgreSQL and S3, with real QLoRA on the
tiny model: a job paused while running keeps a resumable checkpoint, and its next run
continues from it instead of from step 0."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForCausalLM

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.config import Settings
from app.models import Checkpoint, File, Job, JobEvent, Team
from app.schemas import JobCreate
from app.services.files import store_upload
from app.services.jobs import create_job, pause_job, resume_job
from app.services.teams import create_team
from app.storage import ObjectStore
from worker import job_training
from worker.job_hooks import JobHooks
from worker.job_runner import run_job
from worker.training.data import load_examples, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
# 10 examples, batch size 2: 5 steps an epoch, 10 in all.
TRAIN = DATA / "sample_chat_valid.jsonl"
RESUMABLE = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
}


def pause_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Pause the job through the API's service once the worker reports `step`'s metrics."""

    class PausingHooks(JobHooks):
        def on_metrics(self, row: dict) -> None:
            super().on_metrics(row)
            if row["step"] == step:
                with self.sessions() as session:
                    pause_job(session, session.get_one(Team, self.job.team_pk), self.job.id)

    monkeypatch.setattr(job_training, "JobHooks", PausingHooks)


def events(session: Session, job: Job) -> list[JobEvent]:
    return list(
        session.scalars(select(JobEvent).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk))
    )


@pytest.mark.slow
def test_a_paused_job_resumes_from_its_checkpoint(
    settings: Settings,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    with sessions() as session:
        team, _ = create_team(session, "resume")
        upload = store_upload(
            session,
            store,
            team,
            "train.jsonl",
            "fine-tune",
            io.BytesIO(TRAIN.read_bytes()),
            settings.max_file_bytes,
        )
        body = JobCreate(
            model="tiny-random-llama",
            training_file=upload.id,
            hyperparameters={"n_epochs": 2, "batch_size": 2},
            seed=0,
        )
        job = create_job(session, settings, team, body)

    # 1. Paused while running: the loop sees it at step 3 and checkpoints that step.
    pause_after_step(monkeypatch, 2)
    assert run_job(job.id, settings) == "paused"
    monkeypatch.undo()

    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job.id))
        assert (job.status, job.attempt) == ("paused", 1)
        # Figures reported before training are on the job, and in events with their data.
        assert job.stats["tokens"]["train"]["examples"] == 10
        assert 0 < job.stats["model"]["trainable_parameters"]
        # The job is no longer running when the paused run reports its throughput: the
        # event is kept, the job's figures are only written while the run holds the job.
        assert "throughput" not in job.stats and "sample" not in job.stats
        reported = [e.data["kind"] for e in events(session, job) if (e.data or {}).get("kind")]
        assert reported == ["tokens", "model", "throughput"]
        [checkpoint] = session.scalars(select(Checkpoint).where(Checkpoint.job_pk == job.pk))
        assert checkpoint.step_number == 3
        assert events(session, job)[-1].message == "Paused at step 3; checkpoint kept"

    archive = tmp_path / "checkpoint.tar.gz"
    store.get_file(checkpoint.storage_key, archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert RESUMABLE <= set(names)
        assert all("/" not in name for name in names), "flat: the adapter at the root"
        tar.extractall(tmp_path / "checkpoint", filter="data")
    base = AutoModelForCausalLM.from_pretrained(settings.models_dir / "tiny-random-llama")
    tuned = PeftModel.from_pretrained(base, tmp_path / "checkpoint")
    with torch.no_grad():
        assert tuned(input_ids=torch.tensor([[10, 20, 30]])).logits.shape == (1, 3, 384)

    # 2. Resumed: back in line, claimed again, and trained from step 4 to the end.
    with sessions() as session:
        resume_job(session, settings, session.get_one(Team, job.team_pk), job.id)
    assert run_job(job.id, settings) == "succeeded"

    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job.id))
        assert (job.status, job.attempt) == ("succeeded", 2)
        assert set(job.stats) == {"tokens", "model", "throughput", "sample"}
        assert job.stats["throughput"]["tokens"] < job.trained_tokens, "this attempt's share"
        timeline = events(session, job)
        resumed = next(
            i for i, e in enumerate(timeline) if e.message == "Resuming from checkpoint at step 3"
        )
        steps = [e.data["step"] for e in timeline[resumed:] if e.type == "metrics"]
        assert steps == list(range(4, 11)), "this attempt trained steps 4-10 only"
        checkpoints = session.scalars(
            select(Checkpoint.step_number)
            .where(Checkpoint.job_pk == job.pk)
            .order_by(Checkpoint.step_number)
        )
        assert list(checkpoints) == [3, 5, 10]
        metrics_file = session.scalar(
            select(File).where(File.id.in_(job.result_files), File.filename == "metrics.csv")
        )

    store.get_file(metrics_file.storage_key, tmp_path / "metrics.csv")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11)), "both attempts' rows"

    tokenizer = load_tokenizer(settings.models_dir / "tiny-random-llama", chat_template=None)
    examples = load_examples(TRAIN, "chat", tokenizer, job.max_seq_length).examples
    tokens_per_epoch = sum(len(e["input_ids"]) for e in examples)
    assert job.trained_tokens == 2 * tokens_per_epoch, "the steps before the pause count"
