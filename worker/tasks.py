"""Celery tasks: thin shells over worker.job_runner."""

from __future__ import annotations

from app.queue import TRAIN_TASK
from worker.celery_app import celery


@celery.task(name=TRAIN_TASK)
def train_job(job_id: str, token: int | None = None) -> str:
    # Imported here: torch loads in the per-job child process, never in the parent.
    from worker.job_runner import run_job

    return run_job(job_id, token=token)
