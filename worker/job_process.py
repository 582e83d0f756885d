"""`python -m worker.job_process JOB_ID [ATTEMPT]`: the job process's entry point. Trains and
publishes one job the worker already claimed (worker.job_training), in a process of its
own that its supervisor (worker.job_runner.supervise) watches and may kill. Settings come
from the LATHE_* environment the worker passed down."""

from __future__ import annotations

import logging
import os
import signal
import sys

from sqlalchemy import select

from app.config import get_settings
from app.db import make_engine, make_sessionmaker
from app.lifetime import PARENT_PID_ENV, die_with_parent
from app.logs import configure_logging, set_process_fields
from app.models import Job, Team
from worker.job_training import train_or_fail
from worker.registry import worker_id

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/job] %(message)s"  # LATHE_LOG_FORMAT=text


def main(job_id: str, attempt: int | None = None) -> int:
    settings = get_settings()
    configure_logging(settings.log_format, text_format=TEXT_FORMAT)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    try:
        # The process trains one job: all its log lines carry the job, team and worker.
        with sessions() as session:
            team_id = session.scalar(
                select(Team.id).join(Job, Job.team_pk == Team.pk).where(Job.id == job_id)
            )
        set_process_fields(job_id=job_id, team_id=team_id, worker=worker_id())
        outcome = train_or_fail(job_id, settings, sessions, attempt)
    finally:
        engine.dispose()
    logging.info("job %s: %s", job_id, outcome)
    return 0


if __name__ == "__main__":
    # Never outlive the Celery pool process waiting on this one (its parent, whose pid it
    # passes down): killed with it, the GPU is freed and no orphaned run writes to the job.
    parent = os.environ.get(PARENT_PID_ENV)
    die_with_parent(signal.SIGKILL, parent_pid=int(parent) if parent else os.getppid())
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
