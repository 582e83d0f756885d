"""`python -m worker.job_rank WORKDIR`: one rank of a job trained on several devices of its
worker (Job.gpus > 1), started by torch's launcher (worker.training.distributed) from the
job process, which prepared WORKDIR (data, parent adapter, resume checkpoint) and wrote
there what every rank trains (the spec) and who the run is (RUN_FILE).

Every rank runs the same `run_training`. Rank 0 alone reaches the job: its hooks are the
job process's JobHooks (metrics rows, events, checkpoints to storage, tracking, the
pause/cancel poll, which the callback broadcasts), and it writes its TrainingResult back
for the job process to publish. The other ranks train with silent hooks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import SecretStr

from app.config import Settings
from worker.training.distributed import (
    RESULT_FILE,
    SPEC_FILE,
    read_result,
    read_spec,
    record_data_error,
    run_ranks,
    start_rank,
    write_result,
    write_spec,
)
from worker.training.spec import TrainingDataError, TrainingResult, TrainingSpec

RUN_FILE = "rank-run.json"  # the job, its claim (worker, attempt), name and settings


def train_on_ranks(
    spec: TrainingSpec,
    workdir: Path,
    *,
    job_id: str,
    claimed: tuple[str, int],
    model_name: str,
    settings: Settings,
) -> TrainingResult:
    """In the job process: train `spec` as spec.world_size ranks and return rank 0's
    TrainingResult. RankFailed (or a rank's TrainingDataError) if a rank failed."""
    worker, attempt = claimed
    run = {
        "job_id": job_id,
        "worker": worker,
        "attempt": attempt,
        "model_name": model_name,
        # The job process's settings, as they are (a test's are not in the environment);
        # the work directory is the job process's own (mode 0700), deleted after the run.
        "settings": json.loads(json.dumps(settings.model_dump(), default=_plain)),
    }
    (workdir / RUN_FILE).write_text(json.dumps(run))
    write_spec(spec, workdir / SPEC_FILE)
    (workdir / RESULT_FILE).unlink(missing_ok=True)
    run_ranks(spec.world_size, "worker.job_rank", [str(workdir)], workdir)
    return read_result(workdir / RESULT_FILE)


def _plain(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return str(value)  # paths


def main(workdir: Path) -> int:
    start_rank()  # first: die with the launcher; this rank's device
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_train)(workdir)  # an exception's message reaches the job's error


def _train(workdir: Path) -> int:
    from worker.training.distributed import is_main_rank
    from worker.training.run import run_training
    from worker.training.spec import TrainingHooks

    spec = read_spec(workdir / SPEC_FILE)
    run = json.loads((workdir / RUN_FILE).read_text())
    if not is_main_rank():
        hooks, finish = TrainingHooks(), lambda: None
    else:
        hooks, finish = _job_hooks(run, workdir)
    try:
        result = run_training(spec, hooks)
    except TrainingDataError as exc:
        record_data_error(workdir, exc)
        raise
    finally:
        finish()
    if is_main_rank():
        write_result(result, workdir / RESULT_FILE)
    return 0


def _job_hooks(run: dict, workdir: Path):
    """Rank 0's hooks: the job's (worker.job_hooks.JobHooks), fenced by the job process's
    claim, with the job's tracking runs (the job process continues them afterwards); and
    what to call when training ends."""
    from sqlalchemy import select

    from app.db import make_engine, make_sessionmaker
    from app.models import Job
    from app.services import lifecycle
    from app.storage import open_store
    from worker.job_hooks import JobHooks
    from worker.tracking import Tracking
    from worker.training.spec import TrainingHooks

    settings = Settings(**run["settings"])
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        job = session.scalar(select(Job).where(Job.id == run["job_id"]))
        current = (job.worker, job.attempt) if job is not None else None
        if job is not None:
            job.team  # noqa: B018 (loaded now: the hooks name the team's storage keys)
    if current != (run["worker"], run["attempt"]):
        # Claimed again by another attempt since the job process started: this run must
        # not touch the job. It stops at the first step and saves nothing.
        return TrainingHooks(should_stop=lambda: "cancel"), engine.dispose
    store = open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
    fence = lifecycle.run_fence(run["worker"], run["attempt"])
    hooks = JobHooks(job, settings, sessions, store, run["model_name"], fence)
    hooks.start_tracking(Tracking.for_job(job, settings, workdir))
    return hooks.training_hooks(), engine.dispose


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
