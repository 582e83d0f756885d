"""The shared pool with two real worker processes of different classes: fair share across
teams, class routing, drain, and pause/resume, through the API and its scheduler."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.services.admin_keys import create_admin_key
from tests.conftest import create_team_key, serve_in_thread
from tests.e2e.conftest import (
    LARGE,
    SMALL,
    start_worker,
    stop_worker,
    submit,
    upload,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}


def client(live_api: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=live_api, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def admin(live_api: str, e2e_env: dict[str, str]) -> Iterator[httpx.Client]:
    engine = make_engine(e2e_env["LATHE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        _, key = create_admin_key(session, "e2e-operator")
    engine.dispose()
    with client(live_api, key) as c:
        yield c


@pytest.fixture
def team_a(live_api, stack_env, workers) -> Iterator[httpx.Client]:
    with client(live_api, create_team_key(stack_env, "a")[1]) as c:
        yield c


@pytest.fixture
def team_b(live_api, stack_env, workers) -> Iterator[httpx.Client]:
    with client(live_api, create_team_key(stack_env, "b")[1]) as c:
        yield c


def job(api: httpx.Client, job_id: str) -> dict:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def place(api: httpx.Client, job_id: str) -> dict:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}/queue").json()


def start_event_id(api: httpx.Client, job_id: str) -> str | None:
    """The id of the job's 'started' event: ids grow with time across all jobs."""
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    started = [e for e in events["data"] if e["message"].startswith("Fine-tuning job started")]
    return started[-1]["id"] if started else None


def event_pk(admin_env_sessions, event_id: str) -> int:
    from sqlalchemy import select

    from app.models import JobEvent

    with admin_env_sessions() as session:
        return session.scalar(select(JobEvent.pk).where(JobEvent.id == event_id))


@pytest.fixture(scope="module")
def sessions(e2e_env):
    engine = make_engine(e2e_env["LATHE_DATABASE_URL"])
    yield make_sessionmaker(engine)
    engine.dispose()


def test_a_team_with_one_job_goes_before_a_teams_fifth(team_a, team_b, sessions) -> None:
    a_file, b_file = upload(team_a), upload(team_b)
    a_jobs = [submit(team_a, a_file, gpu_class=SMALL) for _ in range(5)]
    b_job = submit(team_b, b_file, gpu_class=SMALL)
    try:
        wait_for(lambda: start_event_id(team_b, b_job), 240, what="team B's job to start")
        b_started = event_pk(sessions, start_event_id(team_b, b_job))
        started_before_b = [
            j
            for j in a_jobs
            if (e := start_event_id(team_a, j)) and event_pk(sessions, e) < b_started
        ]
        # One worker of the class: A's first job runs, then B's, not A's 2nd..5th.
        assert started_before_b == a_jobs[:1]
    finally:
        for j in a_jobs:
            team_a.post(f"/v1/fine_tuning/jobs/{j}/cancel")
        team_b.post(f"/v1/fine_tuning/jobs/{b_job}/cancel")


def test_jobs_run_on_their_class_and_a_too_large_job_is_routed_up(team_a, workers) -> None:
    file_id = upload(team_a)
    pinned = submit(team_a, file_id, gpu_class=LARGE)
    # No class named: the memory estimate (batch x sequence) fits the large class, not the
    # small one (other modules' workers may have announced further classes).
    big = submit(team_a, file_id, max_seq_length=32768)
    eligible = place(team_a, big)["eligible_gpu_classes"]  # None: started already
    assert eligible is None or (LARGE in eligible and SMALL not in eligible), eligible
    for job_id in (pinned, big):
        wait_for(lambda j=job_id: job(team_a, j)["status"] in FINAL, 240, what="the job")
        assert job(team_a, job_id)["status"] == "succeeded"
    events = team_a.get(f"/v1/fine_tuning/jobs/{big}/events", params={"limit": 100}).json()
    assert any(workers[LARGE] in e["message"] for e in events["data"])
    events = team_a.get(f"/v1/fine_tuning/jobs/{pinned}/events", params={"limit": 100}).json()
    assert any(workers[LARGE] in e["message"] for e in events["data"])


def test_a_drained_worker_finishes_its_job_and_takes_no_more(team_a, admin, workers) -> None:
    file_id = upload(team_a)
    first = submit(team_a, file_id, n_epochs=3, gpu_class=SMALL)
    wait_for(lambda: job(team_a, first)["status"] == "running", 120, what="the first job")
    resp = admin.post(f"/v1/admin/workers/{workers[SMALL]}/drain")
    assert resp.status_code == 200, resp.text
    second = submit(team_a, file_id, gpu_class=SMALL)
    try:
        wait_for(lambda: job(team_a, first)["status"] in FINAL, 180, what="the running job")
        assert job(team_a, first)["status"] == "succeeded"

        def drained() -> bool:
            rows = team_a.get("/v1/workers").json()["data"]
            return any(w["id"] == workers[SMALL] and w["status"] == "drained" for w in rows)

        wait_for(drained, 30, what="the worker to show drained")
        assert job(team_a, second)["status"] == "queued"
        assert place(team_a, second)["estimated_start"] is None  # nothing will take it
    finally:
        admin.post(f"/v1/admin/workers/{workers[SMALL]}/undrain")
    wait_for(lambda: job(team_a, second)["status"] in FINAL, 180, what="the undrained worker")
    assert job(team_a, second)["status"] == "succeeded"


def test_pause_keeps_the_checkpoint_and_resume_continues(team_a) -> None:
    file_id = upload(team_a)
    job_id = submit(team_a, file_id, n_epochs=6, gpu_class=LARGE)

    def steps() -> list[int]:
        data = team_a.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
        return [e["data"]["step"] for e in data.json()["data"] if e["type"] == "metrics"]

    wait_for(lambda: len(steps()) >= 3, 180, what="a few training steps")
    assert team_a.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    wait_for(
        lambda: team_a.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"],
        60,
        what="the pause checkpoint",
    )
    paused_at = max(steps())
    # Accepted once the worker has saved the checkpoint and let go (409 until then).
    resumed = wait_for(
        lambda: (
            (r := team_a.post(f"/v1/fine_tuning/jobs/{job_id}/resume")).status_code == 200
            and r.json()
        ),
        60,
        what="the resume to be accepted",
    )
    assert resumed["status"] == "queued"
    wait_for(lambda: job(team_a, job_id)["status"] in FINAL, 240, what="the resumed job")
    assert job(team_a, job_id)["status"] == "succeeded"
    events = team_a.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    assert any("Resuming from checkpoint" in e["message"] for e in events["data"])
    assert min(s for s in steps() if s > paused_at) >= paused_at  # continued, not from 1


def test_quotas_set_by_an_admin_refuse_jobs_with_the_limit_named(live_api, admin, workers) -> None:
    created = admin.post(
        "/v1/admin/teams", json={"name": "quota-e2e", "quotas": {"max_queued_jobs": 1}}
    )
    assert created.status_code == 200, created.text
    team_id, key = created.json()["id"], created.json()["key"]
    with client(live_api, key) as team:
        file_id = upload(team)
        first = submit(team, file_id, gpu_class=SMALL)
        # Paused, it waits (and counts) however fast a worker would have taken it.
        paused = team.post(f"/v1/fine_tuning/jobs/{first}/pause").json()["status"]
        if paused != "paused":  # already running: it stops at the next step
            wait_for(lambda: job(team, first)["status"] == "paused", 60, what="the pause")
        try:
            refused = team.post(
                "/v1/fine_tuning/jobs",
                json={"model": "tiny-random-llama", "training_file": file_id},
            )
            assert refused.status_code == 429
            assert refused.json()["error"]["param"] == "max_queued_jobs"
        finally:
            team.post(f"/v1/fine_tuning/jobs/{first}/cancel")
        patched = admin.patch(
            f"/v1/admin/teams/{team_id}", json={"quotas": {"gpu_hours_per_month": 0}}
        )
        assert patched.status_code == 200, patched.text
        refused = team.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": file_id}
        )
        assert refused.status_code == 403
        assert "gpu_hours_per_month" in refused.json()["error"]["message"]


def training_process(job_id: str) -> int | None:
    """The pid of the `python -m worker.job_process JOB` training the job, if any."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.job_process" in argv and job_id.encode() in argv:
            return int(proc.name)
    return None


def test_a_killed_training_process_fails_its_job_and_frees_the_worker(team_a) -> None:
    file_id = upload(team_a)
    job_id = submit(team_a, file_id, n_epochs=30, gpu_class=SMALL)
    pid = wait_for(lambda: training_process(job_id), 120, what="the training process")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: job(team_a, job_id)["status"] in FINAL, 60, what="the job to end")
    ended = job(team_a, job_id)
    assert ended["status"] == "failed"
    assert ended["error"]["code"] == "training_process_died"
    assert "signal 9" in ended["error"]["message"]
    after = submit(team_a, file_id, gpu_class=SMALL)
    wait_for(lambda: job(team_a, after)["status"] in FINAL, 180, what="the next job")
    assert job(team_a, after)["status"] == "succeeded"


@pytest.fixture
def empty_pool_env(e2e_env: dict[str, str], postgres_server) -> Iterator[dict[str, str]]:
    """A fresh database no worker has ever registered with, no declared classes (as
    docker-compose.yml ships), and a broker database of its own."""
    url = postgres_server.create_database("lathe_empty_pool")
    upgrade(url)
    env = {k: v for k, v in e2e_env.items() if k != "LATHE_GPU_CLASSES"}
    env["LATHE_DATABASE_URL"] = url
    env["LATHE_BROKER_URL"] = e2e_env["LATHE_BROKER_URL"][:-1] + "5"
    yield env
    postgres_server.drop_database(url)


@pytest.fixture
def empty_pool_api(empty_pool_env: dict[str, str]) -> Iterator[httpx.Client]:
    """The API, with its scheduler, on the empty pool; a team's client."""
    key = create_team_key(empty_pool_env, "empty")[1]
    with serve_in_thread(empty_pool_env) as url, client(url, key) as c:
        yield c


def test_an_empty_pool_accepts_a_job_and_runs_it_when_a_worker_appears(
    empty_pool_api, empty_pool_env, tmp_path
) -> None:
    api = empty_pool_api
    job_id = submit(api, upload(api))  # submit asserts the 200
    waiting = place(api, job_id)
    assert (waiting["status"], waiting["estimated_start"]) == ("queued", None)
    assert waiting["waiting_for"].startswith("No worker of a fitting GPU class is online")
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    assert any(e["message"].startswith("No worker of a fitting") for e in events["data"])

    log_path = tmp_path / "late-worker.log"
    worker = start_worker(empty_pool_env, "cpu-late", "late@e2e", 4.0, log_path)
    try:
        wait_ready(worker, log_path)
        wait_for(lambda: job(api, job_id)["status"] in FINAL, 240, what="the job to end")
        assert job(api, job_id)["status"] == "succeeded", log_path.read_text()[-3000:]
    finally:
        stop_worker(worker)
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    assert any("late@e2e" in e["message"] for e in events["data"])
