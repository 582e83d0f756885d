"""`python -m worker.job_process JOB_ID [ATTEMPT]`: train and publish one already-claimed job in a
process of its own (see worker.job_runner.run_job's `isolate`). Settings come from the
LATHE_* environment the worker passed down."""

from __future__ import annotations

import logging
import sys

from app.config import get_settings
from app.db import make_engine, make_sessionmaker
from worker.job_runner import train_or_fail


def main(job_id: str, attempt: int | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/job] %(message)s")
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        outcome = train_or_fail(job_id, settings, make_sessionmaker(engine), attempt)
    finally:
        engine.dispose()
    logging.info("job %s: %s", job_id, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
