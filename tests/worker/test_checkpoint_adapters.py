"""Each checkpoint's adapter, alone, as a file the team can download (issue 14 item 5): the
worker's checkpoint path on PostgreSQL and S3, first with a checkpoint directory laid out as
the Trainer leaves one, then through a real tiny training job (slow)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload, sessionmaker
from transformers import AutoModelForCausalLM

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.config import Settings
from app.models import Checkpoint, File, Job
from app.schemas import JobCreate
from app.services.files import store_upload
from app.services.jobs import create_job
from app.services.teams import create_team
from app.storage import ObjectStore, team_prefix
from worker.job_hooks import JobHooks
from worker.job_runner import run_job

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
# 10 examples, batch size 2: 5 steps in one epoch.
TRAIN = DATA / "sample_chat_valid.jsonl"
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The job world's, checkpointing every 2 steps."""
    return settings.model_copy(update={"checkpoint_every_steps": 2})


@pytest.fixture
def job(settings: Settings, sessions: sessionmaker[Session], store: ObjectStore) -> Job:
    """A queued tiny-model job of team "keep", its team loaded (JobHooks names objects by it)."""
    with sessions() as session:
        team, _ = create_team(session, "keep")
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
            hyperparameters={"n_epochs": 1, "batch_size": 2},
            seed=0,
        )
        job_id = create_job(session, settings, team, body).id
    with sessions() as session:
        return session.scalars(
            select(Job).options(joinedload(Job.team)).where(Job.id == job_id)
        ).one()


def trainer_checkpoint(directory: Path, *, classes: list[str] | None = None) -> Path:
    """A directory as Trainer._save_checkpoint leaves one for a LoRA model."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file(
        {"lora_A.weight": torch.arange(8.0).reshape(2, 4)}, directory / "adapter_model.safetensors"
    )
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (directory / name).write_bytes(b"resume-only state")
    (directory / "trainer_state.json").write_text("{}")
    (directory / "README.md").write_text("model card")
    if classes is not None:
        (directory / "classes.json").write_text(json.dumps(classes))
    return directory


def saved(sessions: sessionmaker[Session], job: Job) -> list[tuple[Checkpoint, File | None]]:
    """The job's checkpoints by step, each with its adapter's file row."""
    with sessions() as session:
        rows = session.execute(
            select(Checkpoint, File)
            .outerjoin(File, File.id == Checkpoint.adapter_file)
            .where(Checkpoint.job_pk == job.pk)
            .order_by(Checkpoint.step_number)
        )
        return [tuple(row) for row in rows]


def members(store: ObjectStore, key: str, path: Path) -> dict[str, bytes]:
    """The archive at `key`: each member's name and bytes (tarfile refuses a path that
    leaves the folder, so a flat archive's names are exactly what extracting writes)."""
    store.get_file(key, path)
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def hooks_for(job: Job, settings: Settings, sessions, store) -> JobHooks:
    return JobHooks(job, settings, sessions, store, "ft:tiny-random-llama:keep::abc", ())


def test_a_checkpoint_uploads_its_adapter_alone_as_a_file_of_the_team(
    job: Job, settings: Settings, sessions, store: ObjectStore, tmp_path: Path
) -> None:
    directory = trainer_checkpoint(tmp_path / "run" / "checkpoint-7")

    hooks_for(job, settings, sessions, store).on_checkpoint(7, directory, {"train_loss": 1.5})

    [(checkpoint, adapter)] = saved(sessions, job)
    assert adapter is not None and checkpoint.adapter_file == adapter.id
    assert (adapter.filename, adapter.purpose, adapter.status) == (
        "checkpoint-step-7-adapter.tar.gz",
        "fine-tune-results",
        "processed",
    )
    assert adapter.team_pk == job.team_pk
    assert adapter.storage_key.startswith(team_prefix(job.team.id))
    archive = members(store, adapter.storage_key, tmp_path / "adapter.tar.gz")
    assert set(archive) == ADAPTER, "no optimizer, scheduler, RNG or trainer state"
    for name, content in archive.items():
        assert content == (directory / name).read_bytes()
    downloaded = (tmp_path / "adapter.tar.gz").read_bytes()
    assert adapter.bytes == len(downloaded)
    assert adapter.sha256 == hashlib.sha256(downloaded).hexdigest()
    # The Trainer checkpoint, for resuming, is still there, whole.
    assert "optimizer.pt" in members(store, checkpoint.storage_key, tmp_path / "ckpt.tar.gz")
    # Nothing is left beside the run's checkpoint directories.
    assert sorted(p.name for p in directory.parent.iterdir()) == ["checkpoint-7"]


def test_a_classifiers_checkpoint_adapter_keeps_its_classes(
    job: Job, settings: Settings, sessions, store: ObjectStore, tmp_path: Path
) -> None:
    directory = trainer_checkpoint(tmp_path / "checkpoint-3", classes=["sports", "world"])

    hooks_for(job, settings, sessions, store).on_checkpoint(3, directory, {})

    [(_, adapter)] = saved(sessions, job)
    archive = members(store, adapter.storage_key, tmp_path / "adapter.tar.gz")
    assert set(archive) == ADAPTER | {"classes.json"}
    assert json.loads(archive["classes.json"]) == ["sports", "world"]


def test_a_checkpoint_without_adapter_weights_is_kept_without_an_adapter_file(
    job: Job, settings: Settings, sessions, store: ObjectStore, tmp_path: Path
) -> None:
    """Resuming needs the checkpoint whatever it holds; only the download is left out."""
    directory = trainer_checkpoint(tmp_path / "checkpoint-4")
    (directory / "adapter_model.safetensors").unlink()

    hooks_for(job, settings, sessions, store).on_checkpoint(4, directory, {})

    [(checkpoint, adapter)] = saved(sessions, job)
    assert (checkpoint.step_number, checkpoint.adapter_file, adapter) == (4, None, None)
    with sessions() as session:
        assert session.scalar(select(File.id).where(File.purpose == "fine-tune-results")) is None


@pytest.mark.slow
def test_each_checkpoint_of_a_job_has_an_adapter_that_loads_with_its_steps_weights(
    job: Job, settings: Settings, sessions, store: ObjectStore, tmp_path: Path
) -> None:
    assert run_job(job.id, settings) == "succeeded"

    checkpoints = saved(sessions, job)
    # Every 2 steps, and the epoch's end.
    assert [c.step_number for c, _ in checkpoints] == [2, 4, 5]
    weights_by_step = {}
    for checkpoint, adapter in checkpoints:
        step = checkpoint.step_number
        assert adapter is not None and adapter.filename == f"checkpoint-step-{step}-adapter.tar.gz"
        archive = members(store, adapter.storage_key, tmp_path / f"adapter-{step}.tar.gz")
        assert set(archive) == ADAPTER
        # The same weights as the Trainer checkpoint's (what a resume would load).
        whole = members(store, checkpoint.storage_key, tmp_path / f"checkpoint-{step}.tar.gz")
        assert archive["adapter_model.safetensors"] == whole["adapter_model.safetensors"]

        folder = tmp_path / f"adapter-{step}"
        with tarfile.open(tmp_path / f"adapter-{step}.tar.gz") as tar:
            tar.extractall(folder, filter="data")
        base = AutoModelForCausalLM.from_pretrained(settings.models_dir / "tiny-random-llama")
        loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, folder))
        expected = load_file(folder / "adapter_model.safetensors")
        assert set(loaded) == set(expected) and expected
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), name
        weights_by_step[step] = expected
    # Each step's adapter is its own (training moved the weights between checkpoints).
    first, last = weights_by_step[2], weights_by_step[5]
    assert any(not torch.equal(first[name], last[name]) for name in first)
