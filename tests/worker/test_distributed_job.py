"""A job on two devices through worker.job_runner (in-process, as test_resume's), on
PostgreSQL and S3: its job process launches two gloo ranks (worker.job_rank); rank 0
reports and checkpoints through the job's hooks, and the job process publishes.

The job's `gpus` is set on its row: what the API accepts is the API's tests' business.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.compat import tarfile  # filter="data" on Python 3.11.2 too
from app.config import Settings
from app.models import Checkpoint, Job, JobEvent
from app.schemas import JobCreate
from app.services.files import store_upload
from app.services.jobs import create_job
from app.services.teams import create_team
from app.storage import ObjectStore
from worker.job_runner import run_job

DATA = Path(__file__).resolve().parents[2] / "app" / "data"
TRAIN = DATA / "sample_chat_valid.jsonl"  # 10 examples: batch 2, 5 steps


def make_job(
    session: Session, settings: Settings, store: ObjectStore, gpus: int, **body: object
) -> Job:
    team, _ = create_team(session, f"team-{gpus}-{len(body)}")
    upload = store_upload(
        session,
        store,
        team,
        "train.jsonl",
        "fine-tune",
        io.BytesIO(TRAIN.read_bytes()),
        settings.max_file_bytes,
    )
    request = JobCreate(
        model="tiny-random-llama",
        training_file=upload.id,
        hyperparameters={"n_epochs": 1, "batch_size": 2},
        seed=0,
        lora={"dropout": 0.0},
        **body,
    )
    job = create_job(session, settings, team, request)
    session.execute(update(Job).where(Job.pk == job.pk).values(gpus=gpus))
    session.commit()
    return job


def metrics_rows(session: Session, job: Job) -> list[dict]:
    events = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_pk == job.pk, JobEvent.type == "metrics")
        .order_by(JobEvent.pk)
    )
    return [e.data for e in events]


def test_a_two_device_job_trains_on_two_ranks_as_on_one_and_publishes(
    settings: Settings, sessions: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    with sessions() as session:
        one = make_job(session, settings, store, gpus=1)
        two = make_job(session, settings, store, gpus=2)
    assert run_job(one.id, settings) == "succeeded"
    assert run_job(two.id, settings) == "succeeded"

    with sessions() as session:
        one, two = (session.scalar(select(Job).where(Job.id == j.id)) for j in (one, two))
        rows_one, rows_two = metrics_rows(session, one), metrics_rows(session, two)
        # Rank 0 wrote the rows, once each; the other rank's hooks are silent.
        assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5]
        assert [r["train_loss"] for r in rows_two] == pytest.approx(
            [r["train_loss"] for r in rows_one], abs=1e-4
        )
        assert two.trained_tokens == one.trained_tokens
        assert len(two.result_files) == 2, "the adapter and metrics.csv, published"
        assert {"tokens", "model", "throughput", "sample"} <= set(two.stats)
        [checkpoint] = session.scalars(select(Checkpoint).where(Checkpoint.job_pk == two.pk))
        assert checkpoint.step_number == 5
        assert checkpoint.adapter_file is not None

    archive = tmp_path / "checkpoint.tar.gz"
    store.get_file(checkpoint.storage_key, archive)
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= names


def test_a_data_error_on_the_ranks_fails_the_job_with_its_code(
    settings: Settings, sessions: sessionmaker[Session], store: ObjectStore
) -> None:
    with sessions() as session:
        job = make_job(
            session, settings, store, gpus=2, max_seq_length=16, training={"truncation": "refuse"}
        )
    assert run_job(job.id, settings) == "failed"
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job.id))
        assert job.error["code"] == "examples_too_long", job.error
