"""The service's benchmarks: `make bench-service` (DEVICE=cuda on a GPU host); docs/benchmarks.md.

- demo_job: the demo's QLoRA job on tiny-random-llama, end to end through the embedded
  server (upload, queue, a worker process, training, adapter upload), and the training
  call alone on the chosen device.
- get_job: latency of GET /v1/fine_tuning/jobs/{id} over HTTP, the API on Postgres.
- dashboard: the web dashboard's job page for a job with 1,000 metrics events, and how soon
  a new event reaches a client of GET .../events?stream=true; then, the team grown to 1,000
  jobs, the job list and the compare page of two jobs with 1,000 metrics events each, and
  every other page of the team's (files, launch, clone, usage, pool) and of an admin's.
- upload: the API process's memory growth while a 1 GB JSONL streams in.
- schedule, pickup: the GPU pool (bench/pool.py): one scheduling decision over 10,000
  queued jobs, and the time from a slot freeing to the next job being picked up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.domain.jobs import FINAL_STATES, JobStatus

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "app" / "data"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`lathe serve` in a child process, with its own LATHE_* environment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env}
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        from app.migrate import upgrade

        upgrade(
            self.env.get("LATHE_DATABASE_URL") or f"sqlite:///{self.env['LATHE_HOME']}/lathe.db"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def key(self) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "create-team", f"bench-{time.time_ns()}"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(field)


def upload(client: httpx.Client, path: Path) -> str:
    with path.open("rb") as fh:
        resp = client.post(
            "/v1/files", data={"purpose": "fine-tune"}, files={"file": (path.name, fh)}, timeout=600
        )
    resp.raise_for_status()
    return resp.json()["id"]


def bench_demo_job(device: str) -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = {"LATHE_HOME": home, "LATHE_DEVICE": device}
        with Server(env) as server:
            client = httpx.Client(
                base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {server.key()}"}
            )
            train, valid = (
                upload(client, DATA / "sample_chat.jsonl"),
                upload(client, DATA / "sample_chat_valid.jsonl"),
            )
            timings = []
            for _ in range(3):
                started = time.perf_counter()
                job = client.post(
                    "/v1/fine_tuning/jobs",
                    json={
                        "model": "tiny-random-llama",
                        "training_file": train,
                        "validation_file": valid,
                        "seed": 42,
                        "hyperparameters": {"n_epochs": 3, "batch_size": 8},
                    },
                ).json()
                while job["status"] not in FINAL_STATES:
                    time.sleep(0.1)
                    job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                assert job["status"] == JobStatus.SUCCEEDED, job["error"]
                timings.append(time.perf_counter() - started)
    return {
        "job_seconds": [round(t, 2) for t in timings],
        "job_seconds_median": round(statistics.median(timings), 2),
    }


def bench_training_call(device: str) -> dict:
    """The training alone (imports and model load excluded): what a GPU speeds up."""
    from app.config import DEFAULT_CHAT_TEMPLATE
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks, TrainingSpec
    from worker.training.tiny_model import ensure_tiny_random_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_tiny_random_llama(Path(tmp) / "tiny", DEFAULT_CHAT_TEMPLATE)
        spec = TrainingSpec(
            base_model_path=model,
            chat_template=DEFAULT_CHAT_TEMPLATE,
            data_format="chat",
            train_file=DATA / "sample_chat.jsonl",
            valid_file=DATA / "sample_chat_valid.jsonl",
            output_dir=Path(tmp) / "run",
            n_epochs=3,
            batch_size=8,
            learning_rate=1e-2,
            max_seq_length=512,
            seed=42,
            device=device,
        )
        started = time.perf_counter()
        result = run_training(spec, TrainingHooks())
        elapsed = time.perf_counter() - started
    losses = [r["train_loss"] for r in result.metrics]
    return {
        "training_seconds": round(elapsed, 2),
        "steps": len(result.metrics),
        "first_loss": round(losses[0], 3),
        "last_loss": round(losses[-1], 3),
        "trained_tokens": result.trained_tokens,
    }


def ensure_database(url: str) -> None:
    """Create the benchmark's database on the server if it is missing."""
    from sqlalchemy import create_engine, make_url, text

    target = make_url(url)
    engine = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        exists = conn.scalar(
            text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}
        )
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    engine.dispose()


@contextmanager
def queued_job(database_url: str):
    """A server on Postgres with one queued job nobody trains: (server, client, job id)."""
    ensure_database(database_url)
    with tempfile.TemporaryDirectory() as home:
        env = {
            "LATHE_HOME": home,
            "LATHE_DATABASE_URL": database_url,
            # A broker nobody consumes: the job stays queued, the API is what is timed.
            "LATHE_BROKER_URL": os.environ.get(
                "LATHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"
            ),
            "LATHE_GPU_CLASSES": '{"cpu": 8}',
            # The limiter stays on (its Redis round trip is part of every request), just high.
            "LATHE_RATE_LIMIT_PER_MINUTE": "1000000",
        }
        with Server(env) as server:
            key = server.key()
            client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"})
            train = upload(client, DATA / "sample_chat.jsonl")
            job = client.post(
                "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": train}
            ).json()
            try:
                yield server, client, job["id"], key
            finally:
                client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


def percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "requests": len(samples),
        "p50_ms": round(samples[len(samples) // 2], 2),
        "p95_ms": round(samples[int(len(samples) * 0.95)], 2),
        "p99_ms": round(samples[int(len(samples) * 0.99)], 2),
    }


def timed(get, url: str, requests: int, warmup: int = 50) -> dict:
    for _ in range(warmup):
        get(url)
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        get(url).raise_for_status()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


def bench_get_job(database_url: str, requests: int) -> dict:
    with queued_job(database_url) as (_, client, job_id, _):
        return timed(client.get, f"/v1/fine_tuning/jobs/{job_id}", requests)


def bench_dashboard(database_url: str, requests: int, steps: int = 1000) -> dict:
    """The dashboard's job page for a job with `steps` metrics events (its loss chart and
    figures rendered on the server), and how soon a new event reaches an event stream."""
    from sqlalchemy import select

    from app.db import make_engine, make_sessionmaker
    from app.models import Job
    from app.services.events import add_event

    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    with queued_job(database_url) as (server, client, job_id, key):
        with sessions() as session:
            job_pk = session.scalar(select(Job.pk).where(Job.id == job_id))
            for step in range(1, steps + 1):
                row = {"step": step, "total_steps": steps, "train_loss": 3 + 1 / step}
                if step % 50 == 0:
                    row["valid_loss"] = 3.2 + 1 / step
                add_event(session, job_pk, f"Step {step}/{steps}", type="metrics", data=row)
            session.commit()
        browser = httpx.Client(base_url=server.url)
        assert browser.post("/login", data={"key": key}).status_code == 303, "signed in"
        page = timed(browser.get, f"/jobs/{job_id}", requests // 10)
        size = len(browser.get(f"/jobs/{job_id}").content)

        # Event stream: write an event, time until the stream delivers it (polled server side).
        delays = []
        url = f"/v1/fine_tuning/jobs/{job_id}/events"
        with client.stream("GET", url, params={"stream": "true"}, timeout=60) as resp:
            lines = resp.iter_lines()
            seen = 0
            written = None
            for line in lines:
                if not line.startswith("id: "):
                    continue
                seen += 1
                if written is not None:
                    delays.append((time.perf_counter() - written) * 1000)
                    if len(delays) == 20:
                        break
                if seen >= steps + 2:  # history sent (the job's own events + the steps)
                    # A random moment within the poll interval, as a worker's event comes.
                    time.sleep(random.uniform(0, 0.6))
                    with sessions() as session:
                        written = time.perf_counter()
                        add_event(session, job_pk, "ping")
                        session.commit()
        lists = bench_team_of_jobs(sessions, job_pk, browser, requests // 10, steps)
    engine.dispose()
    return {
        "job_page": {**page, "metrics_events": steps, "html_bytes": size},
        "event_stream_delivery": percentiles(delays),
        **lists,
    }


def bench_team_of_jobs(sessions, job_pk: int, browser: httpx.Client, requests: int, steps: int):
    """The job list and the compare page on a team of 1,000 jobs, two of them compared with
    `steps` metrics events each: neither page may read every job's metrics. The other jobs
    are copies of the first, finished (so the scheduler has nothing to do), with a learning
    rate and a seed of their own."""
    import uuid

    from sqlalchemy import inspect

    from app.models import Job
    from app.services.events import add_event

    jobs = 1000
    with sessions() as session:
        first = session.get(Job, job_pk)
        columns = {
            attr.key: getattr(first, attr.key)
            for attr in inspect(Job).column_attrs
            if attr.key not in ("pk", "id")
        }
        copies = [
            Job(
                **columns
                | {
                    "id": f"ftjob-{uuid.uuid4().hex[:24]}",
                    "status": JobStatus.SUCCEEDED.value,
                    "hyperparameters": first.hyperparameters | {"learning_rate_multiplier": n},
                    "seed": n,
                    "created_at": first.created_at + n,
                    "started_at": first.created_at + n,
                    "finished_at": first.created_at + n + 60,
                }
            )
            for n in range(1, jobs)
        ]
        session.add_all(copies)
        session.flush()
        for step in range(1, steps + 1):
            row = {"step": step, "total_steps": steps, "train_loss": 2.5 + 1 / step}
            if step % 50 == 0:
                row["valid_loss"] = 2.8 + 1 / step
            add_event(session, copies[-1].pk, f"Step {step}/{steps}", type="metrics", data=row)
        compared = [first.id, copies[-1].id]
        session.commit()
        team_id = first.team.id
    listing = timed(browser.get, "/jobs", requests, warmup=10)
    url = f"/compare?job={compared[0]}&job={compared[1]}"
    compare = timed(browser.get, url, requests, warmup=10)
    pages = {
        path: timed(browser.get, path, requests, warmup=5)
        for path in ("/files", "/jobs/new", f"/jobs/new?from={compared[1]}", "/usage", "/pool")
    }
    admin = admin_browser(sessions, browser)
    admin_paths = ("/admin/teams", f"/admin/teams/{team_id}", "/admin/queue", "/admin/workers")
    pages |= {path: timed(admin.get, path, requests, warmup=5) for path in admin_paths}
    pages["/admin/audit"] = timed(admin.get, "/admin/audit", requests, warmup=5)
    admin.close()
    return {
        "team_pages": {"team_jobs": jobs, **pages},
        "jobs_list": {
            **listing,
            "team_jobs": jobs,
            "html_bytes": len(browser.get("/jobs").content),
        },
        "compare": {
            **compare,
            "team_jobs": jobs,
            "jobs_compared": 2,
            "metrics_events_each": steps,
            "html_bytes": len(browser.get(url).content),
        },
    }


def admin_browser(sessions, team_browser: httpx.Client) -> httpx.Client:
    """A dashboard session signed in with a new admin key, on the same server."""
    from app.services.admin_keys import create_admin_key

    with sessions() as session:
        _, key = create_admin_key(session, f"bench-{time.time_ns()}")
        session.commit()
    admin = httpx.Client(base_url=team_browser.base_url)
    assert admin.post("/login", data={"key": key}).status_code == 303, "admin signed in"
    return admin


def write_jsonl(path: Path, target_bytes: int) -> int:
    line = (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Summarise the ticket in one sentence. " * 4},
                    {
                        "role": "assistant",
                        "content": "The customer cannot log in after the update. " * 3,
                    },
                ]
            }
        ).encode()
        + b"\n"
    )
    block = line * 4096
    written = 0
    with path.open("wb") as out:
        while written < target_bytes:
            out.write(block)
            written += len(block)
    return written


def bench_upload(size_mb: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        big = Path(home) / "big.jsonl"
        size = write_jsonl(big, size_mb * 1024 * 1024)
        with Server({"LATHE_HOME": home}) as server:
            client = httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {server.key()}"}
            )
            upload(client, DATA / "sample_chat_valid.jsonl")  # warm up every code path
            before = server.rss_kib()
            started = time.perf_counter()
            upload(client, big)
            elapsed = time.perf_counter() - started
            peak = server.rss_kib("VmHWM")
    return {
        "bytes": size,
        "seconds": round(elapsed, 1),
        "mb_per_s": round(size / 1e6 / elapsed, 1),
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(peak / 1024, 1),
        "growth_mb": round((peak - before) / 1024, 1),
    }


def main() -> None:
    from bench.pool import bench_pickup, bench_schedule

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--only",
        choices=["demo_job", "training", "get_job", "dashboard", "upload", "schedule", "pickup"],
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "LATHE_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/lathe_bench"
        ),
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args()
    results: dict = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "device": args.device,
    }
    runs = {
        "demo_job": lambda: bench_demo_job(args.device),
        "training": lambda: bench_training_call(args.device),
        "get_job": lambda: bench_get_job(args.database_url, args.requests),
        "dashboard": lambda: bench_dashboard(args.database_url, args.requests),
        "upload": lambda: bench_upload(args.upload_mb),
        "schedule": lambda: bench_schedule(args.database_url),
        "pickup": lambda: bench_pickup(
            args.database_url, os.environ.get("LATHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
        ),
    }
    for name, run in runs.items():
        if args.only in (None, name):
            results[name] = run()
            print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
