"""Multi-GPU hosts on real Postgres + Redis: gang placement, reservations and backfill,
and preemption by fair share with its limits and marks, one `schedule_once` pass at a
time. Worker rows and runs are written as the worker's heartbeat and claim write them;
no process consumes here (tests/e2e/test_multi_gpu.py has real workers)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select, update

from app.broker import make_celery
from app.domain.workers import WorkerState
from app.models import AuditEntry, Job, JobEvent, Team, Worker
from app.services.scheduler import schedule_once
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT
from tests.conftest import settings_from

MODEL = "tiny-random-llama"
HOUR = 3600


@pytest.fixture
def gpu_class() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


@pytest.fixture
def host(sessions) -> Iterator[Callable[..., str]]:
    """Inserts live worker hosts of N GPUs; first takes every other queued job out of line
    (class-less jobs of other tests would compete) and marks it so."""
    with sessions() as session:
        session.execute(update(Job).where(Job.status == "queued").values(status="cancelled"))
        session.commit()
    ids: list[str] = []

    def add(gpu_class: str, gpus: int) -> str:
        worker_id = f"h-{uuid.uuid4().hex[:8]}@host"
        with sessions() as session:
            session.add(
                Worker(
                    id=worker_id,
                    host="host",
                    gpu_name="test",
                    gpu_class=gpu_class,
                    memory_gb=8.0,
                    gpus=gpus,
                    status=WorkerState.ACTIVE,
                    jobs_done=0,
                    last_seen=time.time() + HOUR,  # live for the whole test
                )
            )
            session.commit()
        ids.append(worker_id)
        return worker_id

    yield add
    with sessions() as session:
        session.execute(update(Worker).where(Worker.id.in_(ids)).values(status="stopped"))
        session.execute(
            update(Job).where(Job.worker.in_(ids)).values(status="cancelled", devices=None)
        )
        session.execute(update(Job).where(Job.status == "queued").values(status="cancelled"))
        session.commit()


class Team_:
    """A team's client with its dataset, and the test database's sessions."""

    def __init__(self, client: TeamClient, sessions) -> None:
        self.client, self.sessions, self.id = client, sessions, client.id
        self.train_id = client.upload(CHAT).json()["id"]

    def get(self, url: str):
        return self.client.get(url)

    def post(self, url: str, **kw):
        return self.client.post(url, **kw)


@pytest.fixture
def teams(team, other_team, sessions) -> tuple[Team_, Team_]:
    return Team_(team, sessions), Team_(other_team, sessions)


def submit(team: Team_, gpu_class: str, gpus: int = 1, **values) -> str:
    """A queued job of `gpus` GPUs; `values` are columns set as if time had passed."""
    resp = team.post(
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": team.train_id, "gpu_class": gpu_class},
    )
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["id"]
    set_job(team.sessions, job_id, gpus=gpus, **values)
    return job_id


def set_job(sessions, job_id: str, **values) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def run_on(sessions, job_id: str, worker: str, devices: list[int], **values) -> None:
    """The job running on `devices` of `worker`, as a claim leaves it."""
    now = int(time.time())
    set_job(
        sessions,
        job_id,
        status="running",
        worker=worker,
        devices=devices,
        gpus=len(devices),
        attempt=1,
        started_at=values.pop("started_at", now),
        dispatched_at=None,
        **values,
    )


def schedule(api_env, sessions):
    settings = settings_from(api_env)
    return schedule_once(sessions, settings, make_celery(settings))


def row(sessions, job_id: str) -> Job:
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        session.expunge(job)
        return job


def messages(sessions, job_id: str) -> list[str]:
    with sessions() as session:
        pk = session.scalar(select(Job.pk).where(Job.id == job_id))
        return list(
            session.scalars(
                select(JobEvent.message).where(JobEvent.job_pk == pk).order_by(JobEvent.pk)
            )
        )


def test_a_gang_job_never_starts_on_a_partial_set(
    teams, api_env, sessions, host, gpu_class
) -> None:
    a, _ = teams
    # Two hosts with one GPU free each: two free GPUs, but not on one host.
    h1, h2 = host(gpu_class, 2), host(gpu_class, 2)
    for worker in (h1, h2):
        holder = submit(a, gpu_class)
        run_on(sessions, holder, worker, [0], estimated_finish=int(time.time()) + 900)
    big = submit(a, gpu_class, gpus=2)
    result = schedule(api_env, sessions)
    assert big not in [j for j, _ in result.dispatched]
    queue = a.get(f"/v1/fine_tuning/jobs/{big}/queue").json()
    assert "waits for 2 GPUs of one host: reserved on" in queue["waiting_for"], queue


def test_a_gang_job_takes_all_its_gpus_on_one_host(
    teams, api_env, sessions, host, gpu_class
) -> None:
    a, _ = teams
    host(gpu_class, 1)
    whole = host(gpu_class, 2)
    big = submit(a, gpu_class, gpus=2)
    result = schedule(api_env, sessions)
    assert result.placed_on == {big: whole}
    assert row(sessions, big).dispatched_worker == whole


def test_backfill_only_of_jobs_that_end_before_the_reservation(
    teams, api_env, sessions, host, gpu_class
) -> None:
    a, b = teams
    worker = host(gpu_class, 2)
    holder = submit(b, gpu_class)  # B runs a job: A's big one is first in line
    # GPU 1 frees in a second: the waiting 2-GPU job's reservation starts then, and no
    # 1-GPU job (a typical job lasts minutes) may take GPU 0 meanwhile.
    run_on(sessions, holder, worker, [1], estimated_finish=int(time.time()) + 1)
    big = submit(a, gpu_class, gpus=2, created_at=int(time.time()) - 60)
    small = submit(b, gpu_class)
    assert schedule(api_env, sessions).dispatched == []
    assert "reserved on" in a.get(f"/v1/fine_tuning/jobs/{big}/queue").json()["waiting_for"]
    # GPU 1 frees in 30 days instead: the small job ends long before; it backfills GPU 0.
    set_job(sessions, holder, estimated_finish=int(time.time()) + 30 * 24 * HOUR)
    result = schedule(api_env, sessions)
    assert [j for j, _ in result.dispatched] == [small]
    assert result.placed_on[small] == worker


def test_the_claim_takes_free_devices_and_release_frees_them(
    teams, sessions, host, gpu_class
) -> None:
    from app.services import lifecycle

    a, _ = teams
    worker = host(gpu_class, 4)
    holder = submit(a, gpu_class)
    run_on(sessions, holder, worker, [1])
    big = submit(a, gpu_class, gpus=3)
    too_big = submit(a, gpu_class, gpus=4)
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == big))
        assert lifecycle.claim(session, job, worker=worker, token=None)
        session.commit()
    assert row(sessions, big).devices == [0, 2, 3]
    set_job(sessions, too_big, dispatched_at=int(time.time()), dispatched_worker=worker)
    with sessions() as session:  # no 4 free: refused, and the dispatch handed back
        job = session.scalar(select(Job).where(Job.id == too_big))
        assert not lifecycle.claim(session, job, worker=worker, token=None)
        session.commit()
    assert row(sessions, too_big).dispatched_at is None
    attempt = row(sessions, big).attempt
    with sessions() as session:  # an earlier run of the job ending late: metered, frees nothing
        lifecycle.release(
            session, big, worker=worker, attempt=attempt - 1, seconds=1.0, half_life_hours=24
        )
        session.commit()
    assert row(sessions, big).devices == [0, 2, 3]
    with sessions() as session:
        lifecycle.release(
            session, big, worker=worker, attempt=attempt, seconds=10.0, half_life_hours=24
        )
        session.commit()
    done = row(sessions, big)
    assert done.devices is None
    assert done.gpu_seconds == pytest.approx(33.0)  # 3 GPUs for 1 s, then for 10 s


@pytest.fixture
def preemption_env(api_env) -> dict[str, str]:
    return {
        **api_env,
        "LATHE_PREEMPTION_WAIT_SECONDS": "600",
        "LATHE_PREEMPTION_MAX_PER_JOB": "2",
        "LATHE_PREEMPTION_MIN_RUN_SECONDS": "1800",
    }


def fill(a: Team_, sessions, worker: str, gpu_class: str, n: int, **values):
    """Team A's `n` running jobs, one per GPU of `worker`, started two hours ago."""
    jobs = []
    for device in range(n):
        job_id = submit(a, gpu_class)
        started = int(time.time()) - 2 * HOUR + device  # the last is the newest
        run_on(sessions, job_id, worker, [device], started_at=started, **values)
        jobs.append(job_id)
    return jobs


def test_a_team_over_its_share_is_preempted_for_one_that_waited(
    teams, preemption_env, sessions, host, gpu_class
) -> None:
    a, b = teams
    worker = host(gpu_class, 2)
    first, second = fill(a, sessions, worker, gpu_class, 2)
    waiting = submit(b, gpu_class, created_at=int(time.time()) - 900)
    result = schedule(preemption_env, sessions)
    assert result.preempted == [second]  # the newest of A's
    victim = row(sessions, second)
    assert victim.status == "paused" and victim.preemptions == 1 and victim.preempted_at
    assert "Preempted for fair share" in messages(sessions, second)[-1]
    assert f"Preempting {second}" in messages(sessions, waiting)[-1]
    assert row(sessions, waiting).earmarked_worker == worker  # the freed GPU is held for it
    with sessions() as session:
        audit = session.scalar(
            select(AuditEntry).where(
                AuditEntry.target == second, AuditEntry.action == "job.preempt"
            )
        )
        assert audit.actor == "scheduler" and audit.details["for_job"] == waiting
    # While it stops (it still holds its GPU), nothing more is preempted nor started.
    again = schedule(preemption_env, sessions)
    assert again.preempted == [] and again.dispatched == []
    assert row(sessions, first).status == "running"
    # Its run ends (the worker's release): the waiting job starts on the freed GPU, and
    # the preempted one is back in line, keeping its age, to resume from its checkpoint.
    set_job(sessions, second, devices=None)
    after = schedule(preemption_env, sessions)
    assert after.placed_on == {waiting: worker}
    assert row(sessions, waiting).earmarked_worker is None
    assert after.resumed == [second]
    assert row(sessions, second).status == "queued"
    assert "Resumed automatically after its preemption" in messages(sessions, second)[-1]
    metrics = a.client.client.get("/metrics").text
    assert f'lathe_preemptions_total{{team="{row_team(sessions, second)}"' in metrics


def row_team(sessions, job_id: str) -> str:
    with sessions() as session:
        return session.scalar(
            select(Team.name).join(Job, Job.team_pk == Team.pk).where(Job.id == job_id)
        )


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"preemptions": 2}, "preempted K times already"),
        ({"started_at_offset": 60}, "started less than M ago"),
        ({"preemptible": False}, "marked non-preemptible"),
    ],
)
def test_limits_and_marks_protect_a_job(
    teams, preemption_env, sessions, host, gpu_class, values, why
) -> None:
    a, b = teams
    worker = host(gpu_class, 2)
    offset = values.pop("started_at_offset", None)
    jobs = fill(a, sessions, worker, gpu_class, 2, **values)
    if offset is not None:
        for job_id in jobs:
            set_job(sessions, job_id, started_at=int(time.time()) - offset)
    submit(b, gpu_class, created_at=int(time.time()) - 900)
    assert schedule(preemption_env, sessions).preempted == [], why


def test_a_non_preemptible_team_and_a_short_wait(
    teams, preemption_env, sessions, host, gpu_class
) -> None:
    a, b = teams
    worker = host(gpu_class, 2)
    fill(a, sessions, worker, gpu_class, 2)
    waiting = submit(b, gpu_class, created_at=int(time.time()) - 60)
    assert schedule(preemption_env, sessions).preempted == []  # waited 1 min of 10
    set_job(sessions, waiting, created_at=int(time.time()) - 900)
    with sessions() as session:
        session.execute(update(Team).where(Team.id == a.id).values(preemptible=False))
        session.commit()
    try:
        assert schedule(preemption_env, sessions).preempted == []
    finally:
        with sessions() as session:
            session.execute(update(Team).where(Team.id == a.id).values(preemptible=True))
            session.commit()


def test_a_team_pausing_its_preempted_job_keeps_it_paused(
    teams, preemption_env, sessions, host, gpu_class
) -> None:
    a, b = teams
    worker = host(gpu_class, 2)
    _, second = fill(a, sessions, worker, gpu_class, 2)
    submit(b, gpu_class, created_at=int(time.time()) - 900)
    assert schedule(preemption_env, sessions).preempted == [second]
    assert a.post(f"/v1/fine_tuning/jobs/{second}/pause").status_code == 200
    set_job(sessions, second, devices=None)
    assert schedule(preemption_env, sessions).resumed == []
    assert row(sessions, second).status == "paused"


def test_a_team_that_could_not_start_its_job_preempts_nothing(
    teams, preemption_env, sessions, host, gpu_class
) -> None:
    """B is at its running-jobs quota (0 here, as past its GPU hours): placement would not
    start its job on freed GPUs, so none are freed for it."""
    a, b = teams
    worker = host(gpu_class, 2)
    fill(a, sessions, worker, gpu_class, 2)
    submit(b, gpu_class, created_at=int(time.time()) - 900)
    with sessions() as session:
        session.execute(update(Team).where(Team.id == b.id).values(max_running_jobs=0))
        session.commit()
    assert schedule(preemption_env, sessions).preempted == []
    with sessions() as session:
        session.execute(update(Team).where(Team.id == b.id).values(max_running_jobs=None))
        session.commit()
    assert len(schedule(preemption_env, sessions).preempted) == 1


def test_an_earmark_ends_with_a_pause_or_when_its_host_drains(
    teams, preemption_env, sessions, host, gpu_class
) -> None:
    a, b = teams
    worker = host(gpu_class, 2)
    fill(a, sessions, worker, gpu_class, 2)
    paused = submit(b, gpu_class, created_at=int(time.time()) - 900)
    assert len(schedule(preemption_env, sessions).preempted) == 1
    assert row(sessions, paused).earmarked_worker == worker
    assert b.post(f"/v1/fine_tuning/jobs/{paused}/pause").status_code == 200
    assert row(sessions, paused).earmarked_worker is None
    drained = submit(b, gpu_class, created_at=int(time.time()) - 900)
    set_job(sessions, drained, earmarked_worker=worker)
    with sessions() as session:
        session.execute(
            update(Worker).where(Worker.id == worker).values(status=WorkerState.DRAINING)
        )
        session.commit()
    schedule(preemption_env, sessions)
    assert row(sessions, drained).earmarked_worker is None


def test_a_stopping_run_on_a_worker_gone_holds_no_gpu(
    teams, api_env, sessions, host, gpu_class
) -> None:
    """A paused run whose worker stopped before its release: its GPUs are free again, and
    the job may resume (its resume waits for the devices to be let go)."""
    a, _ = teams
    worker = host(gpu_class, 2)
    job_id = submit(a, gpu_class)
    run_on(sessions, job_id, worker, [0, 1])
    assert a.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    schedule(api_env, sessions)
    assert row(sessions, job_id).devices == [0, 1]  # its live worker is still stopping it
    with sessions() as session:
        session.execute(
            update(Worker).where(Worker.id == worker).values(status=WorkerState.STOPPED)
        )
        session.commit()
    schedule(api_env, sessions)
    assert row(sessions, job_id).devices is None
    assert a.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
