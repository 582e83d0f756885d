"""What one run of a job came to, as run_job returns it and the worker logs it.

Mostly the job's status when the run ended (app.domain.jobs.JobStatus: succeeded, failed,
cancelled, paused). The other outcomes are runs that never held the job, named here so
the claim side and the training side spell them the same way.
"""

from __future__ import annotations

STALE = "stale"  # the job was re-claimed by another attempt before the training started
MISSING = "missing"  # the job's row is gone


def skipped(status: str) -> str:
    """The claim refused: the job was cancelled, paused or taken meanwhile, or the task
    was a stale delivery; `status` is the job's status then."""
    return f"skipped ({status})"
