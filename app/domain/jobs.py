"""Job states and the transitions allowed between them (the state machine)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Jobs waiting for a GPU (they count against a team's queued-jobs quota).
WAITING_STATES = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED})
FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATES = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING})
"""States that change without anyone asking: a page showing such a job refreshes."""

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset(
        {JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED}
    ),
    # running -> queued: the worker was lost and the job goes back in line.
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,
            JobStatus.PAUSED,
        }
    ),
    # paused -> queued is resume: the job waits its turn again and continues from its
    # last checkpoint.
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InvalidTransition(Exception):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"a job that is {current} cannot become {target}")
        self.current = current
        self.target = target


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    return target in ALLOWED_TRANSITIONS[current]


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """The states a job may be in for `target` to be reached: used in guarded UPDATEs."""
    return frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if target in targets)


def check_transition(current: JobStatus, target: JobStatus) -> None:
    if not can_transition(current, target):
        raise InvalidTransition(current, target)


def is_final(status: JobStatus) -> bool:
    return status in FINAL_STATES


class JobKind(StrEnum):
    """What a unit of pool work does: trains (a fine-tuning job) or writes a trained model
    out (an export). Both go through the states above."""

    FINE_TUNE = "fine_tune"
    EXPORT = "export"
