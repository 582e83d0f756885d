"""Celery tasks: thin shells over worker.job_runner (claim -> supervise -> release)."""

from __future__ import annotations

from app.broker import TRAIN_TASK
from worker.celery_app import celery


@celery.task(name=TRAIN_TASK)
def train_job(job_id: str, token: int | None = None) -> str:
    from worker.job_runner import run_job

    # Training runs in a fresh process per job: torch never loads in the pool process.
    return run_job(job_id, token=token, isolate=True)
