"""Per-team quotas and the checks made before a job or a file is accepted.

The checks are pure: the caller counts the team's waiting jobs and its GPU time this month,
and turns a `QuotaExceeded` into an HTTP error. The running-jobs limit is not checked here:
a job over it is still accepted and waits in line, and the scheduler skips the team (see
`app.domain.scheduling.TeamShare.max_running`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Quotas:
    """A team's limits; None means unlimited (or, for a team's own row, use the default)."""

    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None
    """Jobs waiting: validating_files, queued or paused."""
    max_file_bytes: int | None = None
    gpu_hours_per_month: float | None = None
    """GPU hours used by jobs in the current calendar month, UTC (see `month_start`)."""

    def out_of_gpu_hours(self, gpu_seconds_this_month: float) -> bool:
        """At or past the monthly GPU hours: nothing more is created or dispatched."""
        limit = self.gpu_hours_per_month
        return limit is not None and gpu_seconds_this_month >= limit * 3600


# The largest value each quota may be set to: far above any real pool, well inside the
# database columns (Integer, BigInteger, Float), and finite (JSON's Infinity is no limit:
# leave the quota unset for that).
QUOTA_MAXIMA: dict[str, int | float] = {
    "max_running_jobs": 1_000_000,
    "max_queued_jobs": 1_000_000,
    "max_file_bytes": 2**50,  # 1 PiB
    "gpu_hours_per_month": 10_000_000.0,
}
INTEGER_QUOTAS = ("max_running_jobs", "max_queued_jobs", "max_file_bytes")
MAX_WEIGHT = 1_000_000  # a team's fair-share weight; finite, so shares stay numbers


def quota_value_problem(name: str, value: object) -> str | None:
    """Why `value` cannot be quota `name` (a message naming it), or None if it can.
    None (unset: the deployment default) is allowed."""
    if value is None:
        return None
    maximum = QUOTA_MAXIMA[name]
    kind = "an integer" if name in INTEGER_QUOTAS else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} must be {kind}"
    if name in INTEGER_QUOTAS and isinstance(value, float) and not value.is_integer():
        return f"{name} must be {kind}"
    if not math.isfinite(value) or not 0 <= value <= maximum:
        return f"{name} must be {kind} from 0 to {int(maximum)}"
    return None


@dataclass(frozen=True)
class QuotaExceeded(Exception):
    """A quota that a request would exceed; a value object that services can also raise."""

    limit: str
    """The `Quotas` field name."""
    value: float | int
    """The limit, in the field's unit (GPU hours for gpu_hours_per_month)."""
    current: float | int
    """What the team has or asked for, in the same unit."""
    message: str

    def __post_init__(self) -> None:
        # Keep Exception's own view consistent: args, str() and tracebacks show the message.
        object.__setattr__(self, "args", (self.message,))

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[QuotaExceeded], tuple[Any, ...]]:
        # BaseException's pickling would set the fields one by one, which frozen forbids;
        # Celery and multiprocessing pickle exceptions.
        return (type(self), (self.limit, self.value, self.current, self.message))


_frozen_setattr = QuotaExceeded.__setattr__
_frozen_delattr = QuotaExceeded.__delattr__


def _exception_setattr(self: QuotaExceeded, name: str, value: object) -> None:
    """Frozen fields, but the interpreter may still set __traceback__, __notes__ and co."""
    if name.startswith("__"):
        object.__setattr__(self, name, value)
    else:
        _frozen_setattr(self, name, value)


def _exception_delattr(self: QuotaExceeded, name: str) -> None:
    if name.startswith("__"):
        object.__delattr__(self, name)
    else:
        _frozen_delattr(self, name)


# dataclass(frozen=True) refuses a __setattr__ in the class body, so this is set afterwards.
QuotaExceeded.__setattr__ = _exception_setattr  # type: ignore[method-assign]
QuotaExceeded.__delattr__ = _exception_delattr  # type: ignore[method-assign]


def _number(value: float) -> str:
    """12.5 -> "12.5", 10.0 -> "10": figures as a person would write them in a message."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check_new_job(
    quotas: Quotas, queued_jobs: int, gpu_seconds_this_month: float
) -> QuotaExceeded | None:
    """Whether the team may submit one more job, given its waiting jobs and GPU time used.

    Checked at submission so a team over its limits gets an error at once instead of a job
    that never runs. Exceeded when one more job would pass the waiting limit, or when the
    month's GPU hours are already used up.
    """
    if quotas.max_queued_jobs is not None and queued_jobs >= quotas.max_queued_jobs:
        return QuotaExceeded(
            limit="max_queued_jobs",
            value=quotas.max_queued_jobs,
            current=queued_jobs,
            message=(
                "quota max_queued_jobs exceeded: the team already has "
                f"{_plural(queued_jobs, 'job')} waiting (limit {quotas.max_queued_jobs})"
            ),
        )
    if quotas.out_of_gpu_hours(gpu_seconds_this_month):
        used_hours = gpu_seconds_this_month / 3600
        return QuotaExceeded(
            limit="gpu_hours_per_month",
            value=quotas.gpu_hours_per_month,
            current=used_hours,
            message=(
                "quota gpu_hours_per_month exceeded: the team has used "
                f"{_number(used_hours)} GPU hours this month "
                f"(limit {_number(quotas.gpu_hours_per_month)})"
            ),
        )
    return None


def check_upload(quotas: Quotas, size_bytes: int) -> QuotaExceeded | None:
    """Whether a file of `size_bytes` may be stored; a file exactly at the limit is allowed."""
    if quotas.max_file_bytes is not None and size_bytes > quotas.max_file_bytes:
        return QuotaExceeded(
            limit="max_file_bytes",
            value=quotas.max_file_bytes,
            current=size_bytes,
            message=(
                f"quota max_file_bytes exceeded: the file is {size_bytes} bytes "
                f"(limit {quotas.max_file_bytes} bytes)"
            ),
        )
    return None


def merge(team: Quotas, defaults: Quotas) -> Quotas:
    """The quotas in force for a team: its own value where set, else the default."""
    return Quotas(
        **{
            f.name: own if (own := getattr(team, f.name)) is not None else getattr(defaults, f.name)
            for f in fields(Quotas)
        }
    )


def month_start(epoch_seconds: float) -> float:
    """00:00 UTC on the 1st of the month containing `epoch_seconds`, as epoch seconds.

    GPU-hour quotas reset on calendar months in UTC so every server agrees on the boundary.
    """
    moment = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
