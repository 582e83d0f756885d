"""worker.job_runner outside Celery, on the embedded stores (SQLite, a local directory)."""

from __future__ import annotations

import io
from pathlib import Path

from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.models import Job, JobEvent
from app.schemas import JobCreate
from app.services.files import store_upload
from app.services.jobs import create_job
from app.services.teams import create_team
from app.storage import open_store
from worker.job_runner import run_job

DATA = Path(__file__).resolve().parents[2] / "app" / "data"


def test_a_job_whose_dataset_vanished_fails_with_the_cause(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    store = open_store(settings.resolved_storage_url)
    with sessions() as session:
        team, _ = create_team(session, "runner")
        data = (DATA / "sample_chat_valid.jsonl").read_bytes()
        upload = store_upload(
            session, store, team, "t.jsonl", "fine-tune", io.BytesIO(data), settings.max_file_bytes
        )
        job = create_job(
            session, settings, team, JobCreate(model="tiny-random-llama", training_file=upload.id)
        )
        store.delete(upload.storage_key)

    assert run_job(job.id, settings) == "failed"

    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job.id))
        assert job.status == "failed"
        assert job.error["code"] == "training_failed"
        assert job.finished_at is not None
        last = session.scalars(
            select(JobEvent).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk.desc())
        ).first()
        assert (last.level, last.message.startswith("Training failed")) == ("error", True)
    assert run_job(job.id, settings) == "skipped (failed)"
    engine.dispose()
