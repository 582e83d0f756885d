"""The job state machine and "auto" hyperparameters."""

from __future__ import annotations

import pytest

from app.domain.hyperparameters import auto_batch_size, resolve
from app.domain.jobs import (
    FINAL_STATES,
    InvalidTransition,
    JobStatus,
    check_transition,
    sources_of,
)


def test_happy_path_is_allowed() -> None:
    path = [JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    for current, target in zip(path, path[1:], strict=False):
        check_transition(current, target)


@pytest.mark.parametrize("final", sorted(FINAL_STATES))
def test_final_states_are_final(final: JobStatus) -> None:
    for target in JobStatus:
        with pytest.raises(InvalidTransition):
            check_transition(final, target)


def test_cancel_is_possible_from_every_unfinished_state() -> None:
    assert sources_of(JobStatus.CANCELLED) == {
        JobStatus.VALIDATING_FILES,
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.PAUSED,
    }


def test_pause_and_resume_paths() -> None:
    assert sources_of(JobStatus.PAUSED) == {JobStatus.QUEUED, JobStatus.RUNNING}
    check_transition(JobStatus.PAUSED, JobStatus.QUEUED)  # resume
    with pytest.raises(InvalidTransition):
        check_transition(JobStatus.PAUSED, JobStatus.RUNNING)  # only through the queue


def test_only_a_queued_job_can_be_claimed() -> None:
    assert sources_of(JobStatus.RUNNING) == {JobStatus.QUEUED}


def test_explicit_hyperparameters_are_kept() -> None:
    hp = resolve(2, 4, 0.5, examples=1000)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, 4, 0.5)


def test_auto_hyperparameters_scale_with_the_dataset() -> None:
    small, large = resolve("auto", "auto", "auto", 20), resolve("auto", "auto", "auto", 100_000)
    assert small.n_epochs > large.n_epochs
    assert small.batch_size <= 20
    assert large.batch_size == 32
    assert small.learning_rate_multiplier == 1.0
    assert auto_batch_size(3) == 3
