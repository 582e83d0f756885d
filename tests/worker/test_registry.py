"""The worker's registry row on real Postgres: register, heartbeat, drain, restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.models import Job, JobEvent, Team, Worker
from worker.registry import Hardware, Heartbeat, class_from_gpu_name

HW = Hardware("NVIDIA L4", "l4-24gb", 22.5)


@pytest.fixture
def sessions(fresh_postgres_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade(fresh_postgres_url)
    engine = make_engine(fresh_postgres_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def heartbeat(sessions, drains: list) -> Heartbeat:
    settings = Settings(database_url="unused", broker_url="redis://unused")
    return Heartbeat(sessions, settings, "w1@host", HW, lambda resume=False: drains.append(resume))


def add_job(sessions, **fields) -> None:
    """Job ftjob-1 of a new team, with `fields` set."""
    with sessions() as session:
        team = Team(id="team-1", name="t")
        session.add(team)
        session.flush()
        session.add(
            Job(
                id="ftjob-1",
                team_pk=team.pk,
                model="m",
                training_file="file-1",
                hyperparameters={},
                lora={},
                quantization={},
                max_seq_length=64,
                seed=0,
                result_files=[],
                **fields,
            )
        )
        session.commit()


def row(sessions) -> Worker:
    with sessions() as session:
        return session.scalar(select(Worker).where(Worker.id == "w1@host"))


@pytest.mark.parametrize(
    ("name", "memory", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 79.6, "h100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
        ("NVIDIA L4", 22.5, "l4-22gb"),
    ],
)
def test_class_names_come_from_the_gpu_model_and_memory(name, memory, expected) -> None:
    assert class_from_gpu_name(name, memory) == expected


def test_register_beat_drain_and_stop(sessions) -> None:
    drains: list = []
    beat = heartbeat(sessions, drains)
    beat.register()
    registered = row(sessions)
    assert (registered.gpu_class, registered.memory_gb, registered.status) == (
        "l4-24gb",
        22.5,
        "active",
    )
    with sessions() as session:
        session.get_one(Worker, registered.pk).status = "draining"  # what the admin API does
        session.commit()
    beat.beat()
    beat.beat()
    assert drains == [False]  # the queue is left once, not at every beat
    assert row(sessions).status == "drained"  # no job: drained at once
    with sessions() as session:
        session.get_one(Worker, registered.pk).status = "active"  # undrain
        session.commit()
    beat.beat()
    assert drains == [False, True]
    beat.stop()
    assert row(sessions).status == "stopped"


def test_a_restarted_worker_puts_its_previous_incarnations_job_back_in_line(sessions) -> None:
    add_job(sessions, status="running", worker="w1@host", attempt=1)
    heartbeat(sessions, []).register()
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == "ftjob-1"))
        events = session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk)).all()
    assert (job.status, job.worker) == ("queued", None)
    assert any("restarted" in m for m in events)


def test_a_job_whose_worker_restarts_three_times_fails_worker_lost(sessions) -> None:
    """A job that takes its worker host down each time (an OOM kill, say) is not re-queued
    forever: each restart counts as a lost worker, and the third fails it."""
    add_job(sessions, status="queued")
    outcomes = []
    for attempt in (1, 2, 3):
        with sessions() as session:  # claimed again by the worker, which then dies
            job = session.scalar(select(Job).where(Job.id == "ftjob-1"))
            job.status, job.worker, job.attempt = "running", "w1@host", attempt
            session.commit()
        heartbeat(sessions, []).register()
        with sessions() as session:
            job = session.scalar(select(Job).where(Job.id == "ftjob-1"))
            outcomes.append((job.status, job.worker_losses))
    assert outcomes == [("queued", 1), ("queued", 2), ("failed", 3)]
    assert job.error["code"] == "worker_lost"
    with sessions() as session:
        last = session.scalar(
            select(JobEvent.message).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk.desc())
        )
    assert last == "Worker w1@host restarted; the job failed after 3 lost workers"
