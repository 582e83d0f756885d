"""The worker's side of one job, in the Celery pool process: claim -> supervise -> release.

The database is the truth. The claim is a guarded move (queued -> running,
app.services.lifecycle.claim) fenced by the dispatch token the scheduler put in the task,
so a second or stale delivery of a task is a no-op. Training runs in a process of its own
(worker.job_process, then worker.job_training); this side watches the run's fence while
it runs, kills a process that does not stop after a cancel or pause, fails the job if the
process dies, and at the end meters the job's GPU seconds and frees the worker's slot.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, retry_db
from app.domain.jobs import JobStatus
from app.lifetime import child_env
from app.logs import bind, log_context
from app.models import Job
from app.services import lifecycle
from worker.registry import visible_gpus, worker_id
from worker.run_outcome import MISSING, skipped

log = logging.getLogger(__name__)


def run_job(
    job_id: str,
    settings: Settings | None = None,
    token: int | None = None,
    isolate: bool = False,
) -> str:
    """Run one job; `token` is the dispatch token the task carries (None: any).

    With `isolate` (the Celery task), training runs in a fresh Python process
    (worker.job_process): torch and CUDA memory go away with it, the Celery pool process
    stays warm for the next job, and a training process that dies (OOM kill, segfault)
    fails the job with its exit status instead of leaving it running. Without it (tests),
    training runs here.
    """
    # Every log line of the run carries the job, its team and the worker (app/logs.py).
    with log_context(job_id=job_id, worker=worker_id()):
        return _run_job(job_id, settings or get_settings(), token, isolate)


def _run_job(job_id: str, settings: Settings, token: int | None, isolate: bool) -> str:
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    me = worker_id()
    try:
        with sessions() as session:  # claim
            job = session.scalar(select(Job).where(Job.id == job_id))
            if job is None:
                return MISSING
            bind(team_id=job.team.id)
            attempt = job.attempt + 1
            if not lifecycle.claim(session, job, worker=me, token=token):
                session.commit()  # a dispatch taken back, if the GPUs were not free
                return skipped(job.status)
            devices = list(job.devices or [])
            session.commit()
        started = time.monotonic()
        try:
            if isolate:
                return supervise(job_id, sessions, me, attempt, settings, devices)
            from worker.job_training import train_or_fail

            return train_or_fail(job_id, settings, sessions, attempt)
        finally:
            release(sessions, job_id, me, attempt, time.monotonic() - started, settings)
    finally:
        engine.dispose()


def device_env(devices: list[int]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a run holding `devices` (indexes among the worker's own
    GPUs, which may themselves be a CUDA_VISIBLE_DEVICES subset of the host's)."""
    if not devices:
        return {}
    mine = visible_gpus()
    physical = [mine[d] if mine and d < len(mine) else str(d) for d in devices]
    return {"CUDA_VISIBLE_DEVICES": ",".join(physical)}


def supervise(
    job_id: str,
    sessions: sessionmaker[Session],
    me: str,
    attempt: int,
    settings: Settings,
    devices: list[int] | None = None,
) -> str:
    """Train in `python -m worker.job_process` on the GPUs the claim gave the job; if the
    job is cancelled or paused and the process has not stopped on its own within the
    grace period (it polls every step), it is killed (with its ranks, which die with it)
    so the GPUs are freed whatever state training is in."""
    fence = lifecycle.run_fence(me, attempt)
    proc = subprocess.Popen(  # it dies with this process (app/lifetime.py)
        [sys.executable, "-m", "worker.job_process", job_id, str(attempt)],
        env={**child_env(), **device_env(devices or [])},
    )
    stopping_since: float | None = None
    while proc.poll() is None:
        try:
            proc.wait(timeout=settings.heartbeat_seconds)
            break
        except subprocess.TimeoutExpired:
            pass
        with sessions() as session:
            held = session.scalar(select(Job.pk).where(Job.id == job_id, *fence))
        if held is None and stopping_since is None:
            stopping_since = time.monotonic()
        if stopping_since and time.monotonic() - stopping_since > settings.stop_grace_seconds:
            log.warning("job %s: training did not stop; killing it", job_id)
            proc.kill()
            proc.wait()
    with sessions() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    if proc.returncode != 0 and status == JobStatus.RUNNING:
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with status {proc.returncode}"
        )
        from worker.job_training import fail_run  # the job process's own failure path

        fail_run(sessions, job_id, "training_process_died", f"the training process {how}", fence)
        return JobStatus.FAILED
    return status or MISSING


@retry_db
def release(
    sessions: sessionmaker[Session],
    job_id: str,
    me: str,
    attempt: int,
    seconds: float,
    settings: Settings,
) -> None:
    """Meter the run's GPU time and free the GPUs this run (attempt) holds, whatever the
    outcome."""
    with sessions() as session:
        lifecycle.release(
            session,
            job_id,
            worker=me,
            attempt=attempt,
            seconds=seconds,
            half_life_hours=settings.fair_share_half_life_hours,
        )
        session.commit()
