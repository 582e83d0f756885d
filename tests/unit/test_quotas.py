"""Quota checks for new jobs and uploads, merging with defaults, and month boundaries."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest

from app.domain.quotas import QuotaExceeded, Quotas, check_new_job, check_upload, merge, month_start


def test_no_quotas_means_no_limits() -> None:
    assert check_new_job(Quotas(), queued_jobs=10**6, gpu_seconds_this_month=1e12) is None
    assert check_upload(Quotas(), size_bytes=10**15) is None


def test_one_more_waiting_job_than_the_limit_is_refused() -> None:
    quotas = Quotas(max_queued_jobs=3)
    assert check_new_job(quotas, queued_jobs=2, gpu_seconds_this_month=0.0) is None
    exceeded = check_new_job(quotas, queued_jobs=3, gpu_seconds_this_month=0.0)
    assert exceeded is not None
    assert (exceeded.limit, exceeded.value, exceeded.current) == ("max_queued_jobs", 3, 3)
    assert exceeded.message == (
        "quota max_queued_jobs exceeded: the team already has 3 jobs waiting (limit 3)"
    )


def test_gpu_hours_used_up_refuses_a_new_job() -> None:
    quotas = Quotas(gpu_hours_per_month=10.0)
    assert check_new_job(quotas, 0, gpu_seconds_this_month=10 * 3600 - 1) is None
    exceeded = check_new_job(quotas, 0, gpu_seconds_this_month=12.5 * 3600)
    assert exceeded is not None
    assert exceeded.limit == "gpu_hours_per_month"
    assert exceeded.current == pytest.approx(12.5)
    assert "gpu_hours_per_month" in exceeded.message
    assert "12.5" in exceeded.message and "limit 10)" in exceeded.message


def test_an_upload_over_the_limit_is_refused() -> None:
    quotas = Quotas(max_file_bytes=1000)
    assert check_upload(quotas, 1000) is None
    exceeded = check_upload(quotas, 1001)
    assert exceeded is not None
    assert exceeded.limit == "max_file_bytes"
    assert "max_file_bytes" in exceeded.message and "1000" in exceeded.message


def test_quota_exceeded_can_be_raised_and_stays_frozen() -> None:
    exceeded = check_new_job(Quotas(max_queued_jobs=0), 0, 0.0)
    assert exceeded is not None
    with pytest.raises(QuotaExceeded, match="max_queued_jobs") as caught:
        try:
            raise KeyError("cause")
        except KeyError as error:
            raise exceeded from error
    assert caught.value is exceeded
    assert str(exceeded) == exceeded.message
    exceeded.add_note("a note")
    with pytest.raises(AttributeError):
        exceeded.limit = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(exceeded)) == exceeded


def test_a_teams_own_value_wins_over_the_default() -> None:
    team = Quotas(max_running_jobs=5, max_file_bytes=None, gpu_hours_per_month=0.0)
    defaults = Quotas(max_running_jobs=2, max_queued_jobs=10, max_file_bytes=100)
    assert merge(team, defaults) == Quotas(
        max_running_jobs=5, max_queued_jobs=10, max_file_bytes=100, gpu_hours_per_month=0.0
    )


def test_month_start_is_midnight_utc_on_the_first() -> None:
    moment = datetime(2024, 3, 17, 22, 45, 12, tzinfo=UTC).timestamp()
    assert month_start(moment) == datetime(2024, 3, 1, tzinfo=UTC).timestamp()
    first = datetime(2024, 2, 1, tzinfo=UTC).timestamp()
    assert month_start(first) == first
    assert month_start(first - 1) == datetime(2024, 1, 1, tzinfo=UTC).timestamp()
