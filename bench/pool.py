"""Pool benchmarks: one scheduling decision over a deep queue, and the time from a GPU slot
freeing to the next job being picked up by the worker.

- schedule: 10,000 queued jobs from 100 teams (plus 20,000 ended jobs of usage history)
  on Postgres; times `schedule_once` (reconcile, free slots, candidates, fair-share pick,
  guarded dispatch UPDATE; the broker send is outside the timed part) and the queue
  positions of all 10,000 jobs.
- pickup: a real API (scheduler thread, default interval) and a real `lathe worker` on
  Postgres + Redis; jobs whose dataset object is gone fail at once, so the slot frees and
  fills again and again; the gap between the worker's row showing no job and showing the
  next one is timed by polling the row every 5 ms.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, delete, insert, select, text, update

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.domain.jobs import JobStatus
from app.domain.workers import WorkerState
from app.migrate import upgrade
from app.models import Job, Team, Worker
from bench.run import DATA, Server, ensure_database, upload


def _percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "p50_ms": round(samples[len(samples) // 2], 1),
        "p95_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.95))], 1),
        "max_ms": round(samples[-1], 1),
    }


def _fresh_schema(url: str) -> None:
    ensure_database(url)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    upgrade(url)


def _seed_queue(url: str, teams: int, queued: int, history: int) -> None:
    rng = random.Random(7)
    engine = make_engine(url)
    now = int(time.time())
    common = dict(
        model="tiny-random-llama",
        training_file="file-x",
        hyperparameters={},
        lora={},
        quantization={},
        max_seq_length=1024,
        seed=0,
        result_files=[],
        attempt=0,
        dispatch_token=0,
    )
    with engine.begin() as conn:
        conn.execute(
            insert(Team),
            [
                {
                    "id": f"team-{i}",
                    "name": f"team{i}",
                    "created_at": now,
                    "weight": 1 + i % 3,
                    "disabled": False,
                }
                for i in range(teams)
            ],
        )
        pks = conn.execute(select(Team.pk)).scalars().all()
        rows = []
        for i in range(queued):
            rows.append(
                {
                    **common,
                    "id": f"ftjob-q{i}",
                    "team_pk": rng.choice(pks),
                    "status": JobStatus.QUEUED.value,
                    "priority": rng.choice(["low", "normal", "normal", "high"]),
                    "gpu_class": rng.choice([None, None, "a100-80gb", "l4-24gb"]),
                    "memory_gb": rng.uniform(4, 30),
                    "created_at": now - rng.randint(0, 86400),
                    "gpu_seconds": 0.0,
                }
            )
        for i in range(history):
            ended = now - rng.randint(0, 7 * 86400)
            rows.append(
                {
                    **common,
                    "id": f"ftjob-h{i}",
                    "team_pk": rng.choice(pks),
                    "status": JobStatus.SUCCEEDED.value,
                    "priority": "normal",
                    "gpu_class": None,
                    "memory_gb": 8.0,
                    "created_at": ended - 3600,
                    "started_at": ended - 3000,
                    "finished_at": ended,
                    "gpu_seconds": float(rng.randint(60, 7200)),
                }
            )
        conn.execute(insert(Job), rows)
        conn.execute(
            insert(Worker),
            [
                {
                    "id": f"w{i}@bench",
                    "host": "bench",
                    "gpu_name": "bench",
                    "gpu_class": cls,
                    "memory_gb": mem,
                    "status": WorkerState.ACTIVE.value,
                    "jobs_done": 0,
                    "started_at": now,
                    "last_seen": time.time() + 86400,
                }
                for i, (cls, mem) in enumerate([("a100-80gb", 80.0), ("l4-24gb", 24.0)] * 4)
            ],
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


class _NoBroker:
    """Stands in for Celery's send so the timed pass is the decision, not Redis."""

    def send_task(self, *args, **kwargs) -> None:
        pass


def bench_schedule(database_url: str, rounds: int = 40) -> dict:
    from app.services.queue_view import positions
    from app.services.scheduler import schedule_once

    url = database_url.rsplit("/", 1)[0] + "/lathe_bench_schedule"
    _fresh_schema(url)
    _seed_queue(url, teams=100, queued=10_000, history=20_000)
    settings = Settings(database_url=url, broker_url="redis://unused", gpu_classes={})
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    passes = {}
    for free in (1, 8):
        # `free` of the 8 workers are idle; each of the others runs a job holding its GPU.
        with sessions() as session:
            session.execute(delete(Job).where(Job.id.like("ftjob-busy-%")))
            busy = session.scalars(select(Worker).order_by(Worker.pk)).all()[free:]
            team_pk = session.scalar(select(Team.pk).limit(1))
            now = int(time.time())
            for worker in busy:
                session.add(
                    Job(
                        id=f"ftjob-busy-{worker.pk}",
                        team_pk=team_pk,
                        model="tiny-random-llama",
                        training_file="file-x",
                        hyperparameters={},
                        lora={},
                        quantization={},
                        max_seq_length=1024,
                        seed=0,
                        status=JobStatus.RUNNING.value,
                        worker=worker.id,
                        devices=[0],
                        created_at=now,
                        started_at=now,
                        estimated_finish=now + 3600,
                    )
                )
            session.commit()
        samples = []
        for _ in range(rounds):
            # Every pass finds the same slots free: undo the previous pass's dispatches.
            with sessions() as session:
                session.execute(
                    update(Job)
                    .where(Job.dispatched_at.is_not(None), Job.status == JobStatus.QUEUED.value)
                    .values(dispatched_at=None, dispatched_class=None, dispatched_worker=None)
                )
                session.commit()
            started = time.perf_counter()
            result = schedule_once(sessions, settings, _NoBroker())  # type: ignore[arg-type]
            samples.append((time.perf_counter() - started) * 1000)
            assert len(result.dispatched) == free, result
        passes[f"{free}_free_slots"] = _percentiles(samples)
    with sessions() as session:
        started = time.perf_counter()
        count = len(positions(session, settings))
        positions_ms = (time.perf_counter() - started) * 1000
    engine.dispose()
    return {
        "queued_jobs": 10_000,
        "teams": 100,
        "history_jobs": 20_000,
        "pass": passes,
        "positions_of_all_queued_ms": round(positions_ms, 1),
        "positions": count,
    }


def bench_pickup(database_url: str, redis_url: str, jobs: int = 30) -> dict:
    url = database_url.rsplit("/", 1)[0] + "/lathe_bench_pickup"
    _fresh_schema(url)
    gpu_class = f"bench-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory() as home:
        env = {
            "LATHE_HOME": home,
            "LATHE_DATABASE_URL": url,
            "LATHE_BROKER_URL": redis_url,
            "LATHE_GPU_CLASSES": "{}",
        }
        worker_log = open(os.path.join(home, "worker.log"), "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "worker",
                "--gpu-class",
                gpu_class,
                "--memory-gb",
                "8",
                "--name",
                "bench@pickup",
            ],
            env={**os.environ, **env},
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
        try:
            with Server(env) as server:
                engine = make_engine(url)
                sessions = make_sessionmaker(engine)
                deadline = time.monotonic() + 90
                while not _worker_row(sessions):
                    assert time.monotonic() < deadline, "the worker did not register"
                    time.sleep(0.1)
                client = httpx.Client(
                    base_url=server.url, headers={"Authorization": f"Bearer {server.key()}"}
                )
                train = upload(client, DATA / "sample_chat_valid.jsonl")
                for _ in range(jobs):
                    client.post(
                        "/v1/fine_tuning/jobs",
                        json={
                            "model": "tiny-random-llama",
                            "training_file": train,
                            "gpu_class": gpu_class,
                        },
                    ).raise_for_status()
                # Gone from storage: each job fails as soon as its worker fetches the data.
                for stored in Path(home, "objects").rglob("*"):
                    if stored.is_file():
                        stored.unlink()
                gaps = _watch_slot(sessions, jobs)
                engine.dispose()
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            worker_log.close()
            if os.environ.get("LATHE_BENCH_KEEP_LOG"):
                import shutil

                shutil.copy(os.path.join(home, "worker.log"), os.environ["LATHE_BENCH_KEEP_LOG"])
    return {
        "jobs": jobs,
        "slot_free_to_pickup": _percentiles(gaps),
        "mean_ms": round(statistics.mean(gaps), 1),
    }


def _worker_row(sessions) -> Worker | None:
    with sessions() as session:
        return session.scalar(select(Worker).where(Worker.id == "bench@pickup"))


def _watch_slot(sessions, jobs: int) -> list[float]:
    """Poll the worker's row: each None -> job edge after a job -> None edge is a gap."""
    gaps: list[float] = []
    freed_at: float | None = None
    current: str | None = None  # the first pickup follows no freed slot: not counted
    seen = 0
    deadline = time.monotonic() + 60 + jobs * 20
    while seen < jobs and time.monotonic() < deadline:
        with sessions() as session:
            job = session.scalar(select(Worker.current_job).where(Worker.id == "bench@pickup"))
        at = time.perf_counter()
        if job != current:
            if job is None:
                freed_at = at if current is not None else None
            else:
                seen += 1
                if freed_at is not None:
                    gaps.append((at - freed_at) * 1000)
            current = job
        time.sleep(0.005)
    return gaps
