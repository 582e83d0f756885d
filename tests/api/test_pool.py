"""The pool on real Postgres + Redis: scheduler passes, class fit, lost workers, queue
positions, usage and the workers view. Worker rows are inserted as a worker's heartbeat
would; no process consumes here (tests/e2e has the real workers)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from sqlalchemy import select, update

from app.broker import make_celery, worker_queue
from app.db import make_engine, make_sessionmaker
from app.domain.workers import WorkerState
from app.models import Job, JobEvent, Team, Worker
from app.services.admin_keys import create_admin_key
from app.services.scheduler import schedule_once
from app.services.usage import record_gpu_seconds
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT
from tests.conftest import settings_from

MODEL = "tiny-random-llama"


@pytest.fixture
def admin_client(api, sessions) -> TeamClient:
    with sessions() as session:
        _, key = create_admin_key(session, f"ops-{uuid.uuid4().hex[:6]}")
    return TeamClient("admin", key, api)


@pytest.fixture
def gpu_class() -> str:
    """A class no other test uses, so their rows and jobs never mix."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def add_worker(sessions) -> Iterator[Callable[..., str]]:
    """Inserts worker rows; first cancels what earlier tests left queued (class-less jobs
    fit any class and would compete for these workers)."""
    with sessions() as session:
        session.execute(update(Job).where(Job.status == "queued").values(status="cancelled"))
        session.commit()
    ids: list[str] = []

    def add(gpu_class: str, memory_gb: float = 8.0, last_seen: float | None = None) -> str:
        worker_id = insert_worker(sessions, gpu_class, memory_gb=memory_gb, last_seen=last_seen)
        ids.append(worker_id)
        return worker_id

    yield add
    with sessions() as session:
        session.execute(update(Worker).where(Worker.id.in_(ids)).values(status="stopped"))
        session.commit()


def insert_worker(
    sessions,
    gpu_class: str,
    *,
    worker_id: str | None = None,
    memory_gb: float = 8.0,
    status: str = WorkerState.ACTIVE,
    jobs_done: int = 0,
    last_seen: float | None = None,
) -> str:
    """A worker row, as a worker's heartbeat writes it; returns its id."""
    worker_id = worker_id or f"w-{uuid.uuid4().hex[:8]}@host"
    with sessions() as session:
        session.add(
            Worker(
                id=worker_id,
                host="host",
                gpu_name="test",
                gpu_class=gpu_class,
                memory_gb=memory_gb,
                status=status,
                jobs_done=jobs_done,
                last_seen=last_seen or time.time(),
            )
        )
        session.commit()
    return worker_id


def schedule(api_env, sessions):
    settings = settings_from(api_env)
    return schedule_once(sessions, settings, make_celery(settings))


def create(team, train_id: str, **body):
    return team.post(
        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": train_id, **body}
    )


@pytest.fixture
def train_id(team) -> str:
    return team.upload(CHAT).json()["id"]


def test_a_pass_dispatches_to_the_free_workers_queue_with_a_fencing_token(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    worker_id = add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]
    result = schedule(api_env, sessions)
    assert (job_id, gpu_class) in result.dispatched
    assert result.placed_on[job_id] == worker_id
    messages = redis.Redis.from_url(api_env["LATHE_BROKER_URL"]).lrange(
        worker_queue(worker_id), 0, -1
    )
    assert [json.loads(m)["headers"]["argsrepr"] for m in messages] == [repr([job_id, 1])]
    # The one slot now has a dispatch waiting on it: a second pass sends nothing more.
    second = create(team, train_id, gpu_class=gpu_class).json()["id"]
    assert schedule(api_env, sessions).dispatched == []
    with sessions() as session:
        assert session.scalar(select(Job.dispatched_at).where(Job.id == second)) is None


def test_a_job_fitting_no_class_is_refused_at_creation(team, train_id, add_worker) -> None:
    unknown = create(team, train_id, gpu_class="no-such-class")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_gpu_class"
    huge = create(team, train_id, max_seq_length=32768, hyperparameters={"batch_size": 256})
    assert huge.status_code == 400, huge.text
    error = huge.json()["error"]
    assert error["code"] == "insufficient_gpu_memory"
    assert "GB" in error["message"]


def test_a_lost_workers_running_job_goes_back_in_line(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    worker_id = add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]
    with sessions() as session:  # it took the job, then went silent for an hour
        session.execute(
            update(Worker).where(Worker.id == worker_id).values(last_seen=time.time() - 3600)
        )
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="running", worker=worker_id, attempt=1, started_at=int(time.time()))
        )
        session.execute(update(Worker).where(Worker.id == worker_id).values(current_job=job_id))
        session.commit()
    result = schedule(api_env, sessions)
    assert worker_id in result.lost_workers
    assert job_id in result.requeued
    job = team.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued"
    with sessions() as session:
        messages = session.scalars(select(JobEvent.message).join(Job).where(Job.id == job_id)).all()
        status = session.scalar(select(Worker.status).where(Worker.id == worker_id))
    assert status == "lost"
    assert any("was lost" in m for m in messages)


def test_fair_share_dispatches_the_idle_team_first(
    team, other_team, api_env, sessions, add_worker, gpu_class
) -> None:
    add_worker(gpu_class)
    heavy = team.upload(CHAT).json()["id"]
    light = other_team.upload(CHAT).json()["id"]
    a_jobs = [create(team, heavy, gpu_class=gpu_class).json()["id"] for _ in range(3)]
    b_job = create(other_team, light, gpu_class=gpu_class).json()["id"]
    with sessions() as session:  # team A has used the GPU recently; B has not
        session.execute(update(Job).where(Job.id == a_jobs[0]).values(status="succeeded"))
        record_gpu_seconds(session, a_jobs[0], 120.0, half_life_hours=24)
        session.commit()
    assert [j for j, _ in schedule(api_env, sessions).dispatched] == [b_job]
    position = team.get(f"/v1/fine_tuning/jobs/{a_jobs[1]}/queue").json()
    assert position["status"] == "queued"
    assert position["position"] == 1  # B's job is dispatched; A's next is first in line
    assert position["eligible_gpu_classes"] == [gpu_class]
    assert position["estimated_start"] is not None


def test_max_running_jobs_holds_a_teams_jobs_back(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    with sessions() as session:
        session.execute(update(Team).where(Team.id == team.id).values(max_running_jobs=1))
        session.commit()
    add_worker(gpu_class)
    add_worker(gpu_class)
    first = create(team, train_id, gpu_class=gpu_class).json()["id"]
    second = create(team, train_id, gpu_class=gpu_class).json()["id"]
    assert [j for j, _ in schedule(api_env, sessions).dispatched] == [first]
    assert schedule(api_env, sessions).dispatched == []
    assert team.get(f"/v1/fine_tuning/jobs/{second}").json()["status"] == "queued"


def test_queued_jobs_quota_refuses_with_429_naming_the_limit(team, train_id, sessions) -> None:
    with sessions() as session:
        session.execute(update(Team).where(Team.id == team.id).values(max_queued_jobs=1))
        session.commit()
    assert create(team, train_id).status_code == 200
    refused = create(team, train_id)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_queued_jobs")
    assert "limit 1" in error["message"]


def test_gpu_hours_quota_refuses_with_403_and_usage_reports_the_seconds(
    team, train_id, sessions, admin_client
) -> None:
    done = create(team, train_id).json()["id"]
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == done)
            .values(
                status="succeeded",
                gpu_seconds=7200.0,
                finished_at=int(time.time()),
                dispatched_class="a100-80gb",
            )
        )
        session.execute(update(Team).where(Team.id == team.id).values(gpu_hours_per_month=2))
        session.commit()
    usage = team.get("/v1/usage").json()
    assert usage["gpu_seconds"] == 7200.0
    assert usage["gpu_hours"] == 2.0
    assert usage["by_gpu_class"] == {"a100-80gb": 7200.0}
    assert usage["gpu_hours_quota"] == 2
    refused = create(team, train_id)
    assert refused.status_code == 403
    assert refused.json()["error"]["param"] == "gpu_hours_per_month"
    assert team.get("/v1/usage", params={"period": "2020-01"}).json()["gpu_seconds"] == 0
    everyone = {u["team_id"]: u for u in admin_client.get("/v1/admin/usage").json()["data"]}
    assert everyone[team.id]["gpu_hours"] == 2.0
    assert team.get("/v1/admin/usage").status_code == 403
    assert team.get("/v1/usage", params={"period": "soon"}).status_code == 400


def test_file_size_quota_refuses_with_403(team, sessions) -> None:
    with sessions() as session:
        session.execute(update(Team).where(Team.id == team.id).values(max_file_bytes=100))
        session.commit()
    refused = team.upload(CHAT)
    assert refused.status_code == 403
    assert refused.json()["error"]["param"] == "max_file_bytes"


def test_workers_and_queue_views(team, train_id, add_worker, gpu_class) -> None:
    worker_id = add_worker(gpu_class, memory_gb=24.0)
    create(team, train_id, gpu_class=gpu_class)
    workers = {w["id"]: w for w in team.get("/v1/workers").json()["data"]}
    assert workers[worker_id]["gpu_class"] == gpu_class
    assert workers[worker_id]["status"] == "active"
    queue = team.get("/v1/queue").json()
    entry = next(c for c in queue["classes"] if c["gpu_class"] == gpu_class)
    assert (entry["workers"], entry["queued"], entry["memory_gb"]) == (1, 1, 24.0)
    assert entry["queued_by_team"] == {team.id: 1}


def test_pause_and_resume_a_queued_job(team, train_id) -> None:
    job_id = create(team, train_id).json()["id"]
    paused = team.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()
    assert paused["status"] == "paused"
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 409
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 409


def test_concurrent_creations_cannot_pass_the_queued_jobs_quota(team, train_id, api_env) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from app.errors import QuotaError
    from app.schemas import JobCreate
    from app.services.jobs import create_job

    settings = settings_from(api_env)
    engine = make_engine(api_env["LATHE_DATABASE_URL"])
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        session.execute(update(Team).where(Team.id == team.id).values(max_queued_jobs=2))
        session.commit()

    def attempt(_: int) -> str:
        with sessions() as session:
            me = session.scalar(select(Team).where(Team.id == team.id))
            try:
                create_job(session, settings, me, JobCreate(model=MODEL, training_file=train_id))
                return "created"
            except QuotaError:
                return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    engine.dispose()
    assert sorted(outcomes) == ["created"] * 2 + ["refused"] * 6


def test_a_stale_run_cannot_fail_a_job_another_worker_now_holds(team, train_id, sessions) -> None:
    from app.services.lifecycle import run_fence
    from worker.job_training import fail_run

    job_id = create(team, train_id).json()["id"]
    with sessions() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", worker="w2@h", attempt=2)
        )
        session.commit()
    fail_run(sessions, job_id, "training_failed", "database went away", run_fence("w1@h", 1))
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"
    fail_run(sessions, job_id, "training_failed", "real failure", run_fence("w2@h", 2))
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "failed"


def test_a_stopped_workers_running_job_goes_back_in_line_without_counting_a_loss(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    worker_id = add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]
    with sessions() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", worker=worker_id)
        )
        session.execute(update(Worker).where(Worker.id == worker_id).values(status="stopped"))
        session.commit()
    assert job_id in schedule(api_env, sessions).requeued
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
    with sessions() as session:  # an operator's stop is not held against the job
        assert session.scalar(select(Job.worker_losses).where(Job.id == job_id)) == 0
    assert any(
        f"Worker {worker_id} stopped" in m and "not a loss" in m for m in job_messages(team, job_id)
    )


def test_a_team_past_its_gpu_hours_gets_nothing_dispatched(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    add_worker(gpu_class)
    queued = create(team, train_id, gpu_class=gpu_class).json()["id"]
    done = create(team, train_id, gpu_class=gpu_class).json()["id"]
    with sessions() as session:  # the quota is lowered after the job was queued
        session.execute(
            update(Job)
            .where(Job.id == done)
            .values(status="succeeded", gpu_seconds=3600.0, finished_at=int(time.time()))
        )
        session.execute(update(Team).where(Team.id == team.id).values(gpu_hours_per_month=1))
        session.commit()
    assert schedule(api_env, sessions).dispatched == []
    assert team.get(f"/v1/fine_tuning/jobs/{queued}").json()["status"] == "queued"


def test_resume_waits_until_the_worker_has_let_go(
    team, train_id, sessions, add_worker, gpu_class
) -> None:
    worker_id = add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]
    with sessions() as session:  # paused, its run still holding its GPU
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="paused", worker=worker_id, devices=[0])
        )
        session.commit()
    refused = team.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "job_still_stopping"
    with sessions() as session:  # the run ended (lifecycle.release)
        session.execute(update(Job).where(Job.id == job_id).values(devices=None))
        session.commit()
    assert team.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"


def test_an_expired_dispatch_gets_a_new_token(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]
    schedule(api_env, sessions)
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=1))
        session.commit()
    result = schedule(api_env, sessions)  # expires the old dispatch, then sends it again
    assert [j for j, _ in result.dispatched] == [job_id]
    with sessions() as session:
        assert session.scalar(select(Job.dispatch_token).where(Job.id == job_id)) == 3


def test_a_dispatch_the_broker_lost_is_sent_again_with_a_new_token(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    worker_id = add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]
    assert [j for j, _ in schedule(api_env, sessions).dispatched] == [job_id]
    broker = redis.Redis.from_url(api_env["LATHE_BROKER_URL"])
    with sessions() as session:  # a few seconds later: still held, nothing happens
        session.execute(
            update(Job).where(Job.id == job_id).values(dispatched_at=int(time.time()) - 10)
        )
        session.commit()
    assert schedule(api_env, sessions).redispatched == []
    broker.delete(worker_queue(worker_id))  # Redis lost it (a restart, a FLUSHALL)
    result = schedule(api_env, sessions)
    assert result.redispatched == [job_id]
    assert [j for j, _ in result.dispatched] == [job_id]
    messages = broker.lrange(worker_queue(worker_id), 0, -1)
    assert [json.loads(m)["headers"]["argsrepr"] for m in messages] == [repr([job_id, 3])]


@pytest.fixture
def empty_pool(api_env, postgres_server) -> Iterator[tuple[TeamClient, dict[str, str]]]:
    """A fresh database no worker has ever registered with, and no declared classes (as
    docker-compose.yml ships): (a team's client, the environment)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.migrate import upgrade
    from tests.conftest import create_team_key

    url = postgres_server.create_database("lathe_empty_pool")
    upgrade(url)
    env = {k: v for k, v in api_env.items() if k != "LATHE_GPU_CLASSES"}
    env["LATHE_DATABASE_URL"] = url
    assert settings_from(env).declared_gpu_classes == {}
    with TestClient(create_app(settings_from(env))) as client:
        yield TeamClient(*create_team_key(env), client), env
    postgres_server.drop_database(url)


def job_messages(team: TeamClient, job_id: str) -> list[str]:
    events = team.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    return [e["message"] for e in events["data"]]


def test_an_empty_pool_accepts_jobs_says_no_worker_is_online_then_dispatches(
    empty_pool, gpu_class
) -> None:
    team, env = empty_pool
    engine = make_engine(env["LATHE_DATABASE_URL"])
    sessions = make_sessionmaker(engine)
    try:
        train = team.upload(CHAT).json()["id"]
        created = create(team, train)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        assert created.json()["status"] == "queued"
        pinned = create(team, train, gpu_class=gpu_class)  # a class nobody has announced
        assert pinned.status_code == 200, pinned.text
        assert any(
            m.startswith("No worker of a fitting GPU class") for m in job_messages(team, job_id)
        )
        place = team.get(f"/v1/fine_tuning/jobs/{job_id}/queue").json()
        assert (place["status"], place["estimated_start"]) == ("queued", None)
        assert place["waiting_for"].startswith("No worker of a fitting GPU class is online")
        assert schedule(env, sessions).dispatched == []

        insert_worker(sessions, gpu_class, worker_id="late@host")  # a worker registers
        place = team.get(f"/v1/fine_tuning/jobs/{job_id}/queue").json()
        assert place["eligible_gpu_classes"] == [gpu_class]
        assert place["waiting_for"] is None
        assert place["estimated_start"] is not None
        dispatched = {j for j, _ in schedule(env, sessions).dispatched}
        assert dispatched & {job_id, pinned.json()["id"]}  # the one slot took one of them
    finally:
        engine.dispose()


def test_classes_of_workers_no_longer_live_still_accept_jobs_and_bound_their_size(
    empty_pool, gpu_class
) -> None:
    """A rolling restart: the class's only worker is stopped. Jobs for it are accepted and
    told no worker is online; a job larger than every class ever seen is still refused."""
    team, env = empty_pool
    engine = make_engine(env["LATHE_DATABASE_URL"])
    try:
        insert_worker(
            make_sessionmaker(engine),
            gpu_class,
            worker_id="gone@host",
            status=WorkerState.STOPPED,
            jobs_done=3,
            last_seen=time.time() - 86400,
        )
    finally:
        engine.dispose()
    train = team.upload(CHAT).json()["id"]
    pinned = create(team, train, gpu_class=gpu_class)
    assert pinned.status_code == 200, pinned.text
    notice = f"No worker of a fitting GPU class ({gpu_class}) is online"
    assert any(m.startswith(notice) for m in job_messages(team, pinned.json()["id"]))
    place = team.get(f"/v1/fine_tuning/jobs/{pinned.json()['id']}/queue").json()
    assert place["waiting_for"].startswith(notice)
    unknown = create(team, train, gpu_class="no-such-class")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_gpu_class"
    huge = create(team, train, max_seq_length=32768, hyperparameters={"batch_size": 256})
    assert huge.status_code == 400, huge.text
    error = huge.json()["error"]
    assert error["code"] == "insufficient_gpu_memory"
    assert repr(gpu_class) in error["message"]


def test_lost_and_restarted_workers_count_together_toward_worker_lost(
    team, train_id, api_env, sessions, add_worker, gpu_class
) -> None:
    """Lease expiry (the scheduler) and a restart (the worker's registry) are both losses,
    counted on the job, not by the events' wording: the third fails it."""
    from worker.registry import Hardware, Heartbeat

    first = add_worker(gpu_class)
    job_id = create(team, train_id, gpu_class=gpu_class).json()["id"]

    def runs_on(worker_id: str) -> None:  # dispatched and claimed, as the worker does
        with sessions() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status="running", worker=worker_id, attempt=Job.attempt + 1)
            )
            session.commit()

    def silent(worker_id: str) -> None:
        with sessions() as session:
            session.execute(
                update(Worker).where(Worker.id == worker_id).values(last_seen=time.time() - 3600)
            )
            session.commit()

    runs_on(first)
    silent(first)
    assert job_id in schedule(api_env, sessions).requeued  # loss 1: the lease expired

    second = add_worker(gpu_class)
    runs_on(second)
    restarted = Heartbeat(
        sessions, settings_from(api_env), second, Hardware("test", gpu_class, 8.0), print
    )
    restarted.register()  # loss 2: it came back under the same id, without the job
    assert team.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"

    runs_on(second)
    silent(second)
    result = schedule(api_env, sessions)  # loss 3
    assert job_id not in result.requeued
    job = team.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert "3 times" in job["error"]["message"]
    with sessions() as session:
        assert session.scalar(select(Job.worker_losses).where(Job.id == job_id)) == 3
    messages = job_messages(team, job_id)
    assert any("restarted; the job is back in line (2 of 3" in m for m in messages)
