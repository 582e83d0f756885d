"""Hundreds of simultaneous requests from one team key, against a real uvicorn server on
Postgres and on the embedded SQLite default: none fails, and /healthz answers at once.

Before requests held a pooled connection only while a query ran, about 55 of these (70 on
Postgres) checked out every connection of the pool while the threads that would have
returned them waited for a connection themselves: 500s after the pool's 30 s timeout.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import create_team_key, settings_from, wait_for
from tests.e2e.conftest import DATA, free_port

pytestmark = pytest.mark.slow

STREAMS, FILE_GETS, JOB_GETS = 100, 120, 80
HEALTHZ_WITHIN_S = 10.0  # the stall took 30 s; a loaded 2-core CI machine has seen 5.7 s


def serve(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """The app under uvicorn in a process of its own, as `lathe serve` runs it (but with
    no embedded worker: the jobs stay queued, so their streams stay open)."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
            + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def up() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 60, interval=0.1, what="uvicorn")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def postgres_env(stack_env: dict[str, str], postgres_server) -> Iterator[dict[str, str]]:
    from app.migrate import upgrade

    url = postgres_server.create_database("lathe_stall")
    upgrade(url)
    yield {
        **stack_env,
        "LATHE_DATABASE_URL": url,
        "LATHE_SCHEDULER_IN_API": "false",  # the job stays queued: its streams stay open
        "LATHE_GPU_CLASSES": '{"cpu": 8}',
    }
    postgres_server.drop_database(url)


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    from app.migrate import upgrade

    env = {"LATHE_HOME": str(tmp_path / "home"), "LATHE_SCHEDULER_IN_API": "false"}
    upgrade(settings_from(env).resolved_database_url)
    return env


async def hammer(base_url: str, key: str) -> tuple[list[str], list[float]]:
    """Open STREAMS event streams, then send FILE_GETS + JOB_GETS requests at once while
    timing /healthz; every outcome ("200", "500", "ReadTimeout", ...) and each probe's
    latency."""
    auth = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=base_url, headers=auth, timeout=20, limits=limits
    ) as client:
        with (DATA / "sample_chat_valid.jsonl").open("rb") as fh:
            upload = await client.post(
                "/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", fh)}
            )
        assert upload.status_code == 200, upload.text
        created = await client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-random-llama", "training_file": upload.json()["id"]},
        )
        assert created.status_code == 200, created.text
        job_url = f"/v1/fine_tuning/jobs/{created.json()['id']}"

        outcomes: list[str] = []
        opened = 0
        all_open = asyncio.Event()

        async def watch() -> None:
            nonlocal opened
            try:
                async with client.stream("GET", f"{job_url}/events?stream=true") as resp:
                    outcomes.append(str(resp.status_code))
                    opened += 1
                    if opened == STREAMS:
                        all_open.set()
                    async for _ in resp.aiter_lines():
                        pass
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)
                all_open.set()  # no point waiting for the rest

        async def get(url: str) -> None:
            try:
                outcomes.append(str((await client.get(url)).status_code))
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

        latencies: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                started = time.monotonic()
                try:
                    resp = await client.get("/healthz", headers={"Authorization": ""})
                    assert resp.status_code == 200
                except httpx.HTTPError:
                    pass
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.2)

        watchers = [asyncio.create_task(watch()) for _ in range(STREAMS)]
        prober = asyncio.create_task(probe())
        try:
            await asyncio.wait_for(all_open.wait(), 25)
        except TimeoutError:
            outcomes.append("streams did not open within 25 s")
        burst = [get("/v1/files") for _ in range(FILE_GETS)]
        burst += [get(job_url) for _ in range(JOB_GETS)]
        await asyncio.gather(*burst)
        done.set()
        await prober
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return outcomes, latencies


def check(base_url: str, env: dict[str, str]) -> None:
    _, key = create_team_key({"LATHE_DATABASE_URL": settings_from(env).resolved_database_url})
    outcomes, latencies = asyncio.run(hammer(base_url, key))
    failures = sorted({o for o in outcomes if o != "200"})
    assert not failures, f"{sum(o != '200' for o in outcomes)} of {len(outcomes)}: {failures}"
    assert len(outcomes) == STREAMS + FILE_GETS + JOB_GETS
    assert latencies and max(latencies) < HEALTHZ_WITHIN_S, f"/healthz took {max(latencies):.1f} s"


def test_hundreds_of_concurrent_requests_on_postgres_all_succeed(
    postgres_env, tmp_path: Path
) -> None:
    for base_url in serve(postgres_env, tmp_path / "api.log"):
        check(base_url, postgres_env)


def test_hundreds_of_concurrent_requests_on_sqlite_all_succeed(sqlite_env, tmp_path) -> None:
    for base_url in serve(sqlite_env, tmp_path / "api.log"):
        check(base_url, sqlite_env)
