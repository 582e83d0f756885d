"""Fault injection on real processes: a worker killed mid-training (the job resumes from
its checkpoint on another worker), and Redis flushed while jobs run (all still succeed).

These run on a stack of their own (Redis database 2, their own API and workers), so the
flushes and kills never touch the other end-to-end tests' workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import redis

from app.lifetime import child_env
from tests.conftest import create_team_key, serve_in_thread
from tests.e2e.conftest import (
    KillableWorker,
    free_port,
    stop_worker,
    team_client,
    upload,
    wait_for,
)
from tests.e2e.conftest import submit as submit_job

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}
CLASS = "cpu-faults"


@pytest.fixture(scope="module")
def fault_env(e2e_env: dict[str, str]) -> dict[str, str]:
    return {
        **e2e_env,
        "LATHE_BROKER_URL": e2e_env["LATHE_BROKER_URL"][:-1] + "2",
        "LATHE_WORKER_LEASE_SECONDS": "6",
        "LATHE_CHECKPOINT_EVERY_STEPS": "2",
        "LATHE_BROKER_CHECK_SECONDS": "2",
    }


@pytest.fixture(scope="module")
def fault_api(fault_env: dict[str, str]) -> Iterator[httpx.Client]:
    _, key = create_team_key(fault_env, "faults")
    with serve_in_thread(fault_env) as url, team_client(url, key) as client:
        yield client


@pytest.fixture
def start_worker(fault_env, tmp_path: Path) -> Iterator:
    started: list[KillableWorker] = []

    def start(name: str) -> KillableWorker:
        worker = KillableWorker(fault_env, name, tmp_path, CLASS)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            stop_worker(worker.proc)


def submit(api: httpx.Client, n_epochs: int) -> str:
    return submit_job(api, upload(api), n_epochs, gpu_class=CLASS)


def status(api: httpx.Client, job_id: str) -> str:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]


def messages(api: httpx.Client, job_id: str) -> list[dict]:
    data = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    return data["data"][::-1]  # oldest first


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_on_another(
    fault_api, start_worker
) -> None:
    victim = start_worker("victim@faults")
    job_id = submit(fault_api, n_epochs=4)  # 5 steps an epoch, a checkpoint every 2
    wait_for(
        lambda: fault_api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"],
        180,
        what="a first checkpoint",
    )
    victim.kill_tree()
    killed_at = max(
        e["data"]["step"] for e in messages(fault_api, job_id) if e["type"] == "metrics"
    )
    start_worker("rescuer@faults")
    wait_for(lambda: status(fault_api, job_id) in FINAL, 240, what="the job to finish")
    job = fault_api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    timeline = messages(fault_api, job_id)
    texts = [e["message"] for e in timeline]
    assert any("victim@faults was lost" in t for t in texts), texts
    resumed = next(i for i, t in enumerate(texts) if t.startswith("Resuming from checkpoint"))
    step = int(texts[resumed].split("step ")[1].split()[0])
    assert 2 <= step <= killed_at  # the last checkpoint before the kill, not step 0
    after = [e["data"]["step"] for e in timeline[resumed:] if e["type"] == "metrics"]
    assert after and min(after) == step + 1  # continued where the checkpoint left off
    assert max(after) == 20
    assert any("started on worker rescuer@faults" in t for t in texts[:resumed])


def test_jobs_survive_redis_being_flushed_while_they_run(
    fault_api, fault_env, start_worker
) -> None:
    start_worker("steady@faults")
    jobs = [submit(fault_api, n_epochs=1) for _ in range(3)]
    broker = redis.Redis.from_url(fault_env["LATHE_BROKER_URL"])
    stop = threading.Event()
    flushes = 0

    def flush_repeatedly() -> None:
        nonlocal flushes
        while not stop.wait(0.7):
            broker.flushdb()
            flushes += 1

    flusher = threading.Thread(target=flush_repeatedly, daemon=True)
    flusher.start()
    try:
        wait_for(lambda: all(status(fault_api, j) in FINAL for j in jobs), 300, what="all the jobs")
    finally:
        stop.set()
        flusher.join()
    assert [status(fault_api, j) for j in jobs] == ["succeeded"] * 3
    assert flushes >= 5


def serve(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=child_env({**os.environ, **env}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 60, what="lathe serve")
    return proc


def test_an_upload_cut_by_an_api_restart_leaves_no_file(fault_env, tmp_path: Path) -> None:
    team_id, key = create_team_key(fault_env, "cut")
    port = free_port()
    api = serve(fault_env, port, tmp_path / "api.log")
    line = b'{"text": "' + b"x" * 1000 + b'"}\n'

    def body():
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for i in range(20_000):  # ~20 MB, never finished: the API dies at ~2 MB
            if i == 2_000:
                api.kill()
                api.wait()
            yield line

    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"http://127.0.0.1:{port}/v1/files",
            content=body(),
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "multipart/form-data; boundary=B",
            },
            timeout=30,
        )
    api = serve(fault_env, port, tmp_path / "api.log")  # restarted
    try:
        listed = httpx.get(
            f"http://127.0.0.1:{port}/v1/files", headers={"Authorization": f"Bearer {key}"}
        ).json()
        assert listed["data"] == []
        bucket, prefix = fault_env["LATHE_STORAGE_URL"].removeprefix("s3://").split("/", 1)
        s3 = boto3.client("s3", endpoint_url=fault_env["LATHE_S3_ENDPOINT_URL"])
        objects = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/teams/{team_id}/")
        assert objects.get("KeyCount", 0) == 0
    finally:
        api.terminate()
        api.wait(timeout=30)


def rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_soak_many_clients_polling_while_jobs_run(fault_env, start_worker, tmp_path) -> None:
    start_worker("soak@faults")
    port = free_port()
    env = {**fault_env, "LATHE_RATE_LIMIT_PER_MINUTE": "100000"}
    api = serve(env, port, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    _, key = create_team_key(env, "soak")
    client = team_client(base, key)
    try:
        jobs = [submit(client, n_epochs=2) for _ in range(2)]
        for _ in range(200):  # warm up before the baseline
            client.get(f"/v1/fine_tuning/jobs/{jobs[0]}")
        baseline = rss_mb(api.pid)
        errors: list[str] = []
        done = threading.Event()
        counts = [0] * 16

        def poll(n: int) -> None:
            with team_client(base, key) as c:
                while not done.is_set():
                    for url in (
                        f"/v1/fine_tuning/jobs/{jobs[n % 2]}",
                        f"/v1/fine_tuning/jobs/{jobs[n % 2]}/events",
                        "/v1/fine_tuning/jobs",
                        "/v1/queue",
                    ):
                        r = c.get(url)
                        counts[n] += 1
                        if r.status_code != 200:
                            errors.append(f"{url}: {r.status_code} {r.text[:200]}")

        threads = [threading.Thread(target=poll, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        try:
            wait_for(
                lambda: all(
                    client.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] in FINAL for j in jobs
                ),
                300,
                interval=1,
                what="the jobs under load",
            )
        finally:
            done.set()
            for t in threads:
                t.join()
        growth = rss_mb(api.pid) - baseline
        statuses = [client.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] for j in jobs]
    finally:
        client.close()
        api.terminate()
        api.wait(timeout=30)
    assert errors == []
    assert statuses == ["succeeded", "succeeded"]
    assert sum(counts) > 1000
    assert growth < 50, f"API memory grew {growth:.1f} MB over {sum(counts)} requests"
