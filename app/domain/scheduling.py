"""Fair-share scheduling: which queued job gets the next free GPU slot.

Policy
------
GPU time is shared between teams in proportion to their weights, not handed out first come,
first served, so one team submitting a hundred jobs cannot starve a team that submits one.

* A team's *charge* is its recent GPU usage plus what it is using now::

      charge = recent_gpu_seconds
               + sum(max(elapsed, dispatch_charge) * gpus for each running job)

  A job on N GPUs for T seconds costs N*T GPU-seconds (and a dispatch N*dispatch_charge).

  ``recent_gpu_seconds`` is the usage of the team's ended jobs, decayed with a half-life (see
  `decayed_usage`), so old usage is gradually forgiven. ``dispatch_charge`` (default 300 s)
  makes a job that has just started already count as 5 GPU-minutes: when one scheduling pass
  fills several free slots, teams take turns instead of the first team taking them all.
* A team's *normalized usage* is ``charge / weight``. A team of weight 2 is entitled to twice
  the GPU time of a team of weight 1.
* The team with the least normalized usage goes first. Ties go to the team whose oldest
  waiting job (among those that can run on the slot's GPU class) is oldest, then to the lower
  team key.
* Within a team, jobs go by priority (high, then normal, then low), then by age (older first),
  then by key. A team's priorities order only its own jobs: a high-priority job never jumps
  ahead of another team that has used less.
* A team that already has ``max_running`` jobs running or dispatched is skipped.
* A job runs only on a GPU class listed in its ``eligible`` set.

Teams with no `TeamShare` are treated as weight 1 with no usage. Everything here is pure:
the caller loads the queue and the usage figures, and persists what it decides.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from itertools import accumulate

PRIORITIES = ("low", "normal", "high")
"""A job's priority within its team, lowest first."""

DEFAULT_DISPATCH_CHARGE = 300.0

_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class QueuedJob:
    key: int
    """The database primary key; opaque here, used only as the last tie-breaker."""
    team: int
    priority: str
    created_at: float
    """Epoch seconds."""
    eligible: frozenset[str]
    """The GPU classes this job may run on (large enough, and allowed for the team)."""
    gpus: int = 1
    """GPUs of one host it needs, all at once (app.domain.placement)."""
    expected_seconds: float | None = None
    """How long it is expected to hold them (None: the pool's typical job); backfill
    decides with it whether the job ends before a reservation."""


@dataclass
class TeamShare:
    team: int
    weight: float
    """> 0; a team with weight 2 is entitled to twice the GPU time of a team with weight 1."""
    recent_gpu_seconds: float
    """Decayed usage of the team's ended jobs (see `decayed_usage`)."""
    running: list[float] = field(default_factory=list)
    """Elapsed seconds of each job the team has running or dispatched now."""
    running_gpus: list[int] = field(default_factory=list)
    """GPUs each of those jobs holds, in the same order (missing entries: 1). N GPUs for T
    seconds cost N*T."""
    max_running: int | None = None
    """Quota: at most this many jobs running or dispatched at once (None: no limit)."""

    @property
    def full(self) -> bool:
        """At its quota now: no further job of the team would be started."""
        return self.max_running is not None and len(self.running) >= self.max_running


def _check_priorities(candidates: Iterable[QueuedJob]) -> None:
    """Fail with the offending job named, rather than a bare KeyError in the middle of a sort."""
    for job in candidates:
        if job.priority not in _RANK:
            raise ValueError(
                f"job {job.key} has unknown priority {job.priority!r}; expected one of {PRIORITIES}"
            )


class _Team:
    """One team's mutable state during a pass; the caller's `TeamShare` is never touched."""

    __slots__ = ("team", "weight", "charge", "running", "max_running")

    def __init__(self, team: int, share: TeamShare | None, dispatch_charge: float) -> None:
        self.team = team
        if share is None:
            self.weight, self.charge, self.running, self.max_running = 1.0, 0.0, 0, None
            return
        if not share.weight > 0:
            raise ValueError(f"team {team} has weight {share.weight}; weights must be > 0")
        self.weight = float(share.weight)
        sizes = [*share.running_gpus, *[1] * (len(share.running) - len(share.running_gpus))]
        self.charge = share.recent_gpu_seconds + sum(
            max(elapsed, dispatch_charge) * gpus
            for elapsed, gpus in zip(share.running, sizes, strict=False)
        )
        self.running = len(share.running)
        self.max_running = share.max_running

    @property
    def usage(self) -> float:
        return self.charge / self.weight

    @property
    def full(self) -> bool:
        return self.max_running is not None and self.running >= self.max_running


class _Waiting:
    """One team's waiting jobs in dispatch order, and the age of the oldest one still left.

    A pass takes a team's jobs strictly in this order, so the jobs left are always a suffix
    of the list and the oldest of them is a precomputed suffix minimum: O(1) per pick.
    """

    __slots__ = ("jobs", "oldest", "next")

    def __init__(self, jobs: list[tuple[int, QueuedJob]]) -> None:
        self.jobs = jobs
        ages = accumulate((job.created_at for _, job in reversed(jobs)), min)
        self.oldest = [*reversed(list(ages)), math.inf]
        self.next = 0


def _group(
    candidates: Sequence[QueuedJob], taken: set[int], gpu_class: str | None
) -> dict[int, _Waiting]:
    """Each team's waiting jobs as (index, job) in dispatch order, leaving out `taken`
    indexes and jobs not eligible for `gpu_class` (None: keep all).

    Within a team: higher priority first, then older, then lower key. One sort of all the
    jobs, then a split by team, keeps every team's list in that order.
    """
    rank = _RANK
    kept = [
        (index, job)
        for index, job in enumerate(candidates)
        if index not in taken and (gpu_class is None or gpu_class in job.eligible)
    ]
    kept.sort(key=lambda item: (-rank[item[1].priority], item[1].created_at, item[1].key))
    per_team: dict[int, list[tuple[int, QueuedJob]]] = {}
    for item in kept:
        team_jobs = per_team.get(item[1].team)
        if team_jobs is None:
            per_team[item[1].team] = [item]
        else:
            team_jobs.append(item)
    return {team: _Waiting(jobs) for team, jobs in per_team.items()}


def _fill(
    waiting: dict[int, _Waiting],
    teams: dict[int, _Team],
    taken: set[int],
    slots: int,
    dispatch_charge: float,
    respect_quota: bool,
) -> list[QueuedJob]:
    """Pick up to `slots` jobs, least normalized usage first, charging each team per pick.

    Only the team just picked changes between picks, so a heap of teams keyed by (usage,
    oldest waiting job, team) stays valid if that one team is pushed back with its new key.
    Picked indexes are added to `taken`.
    """
    heap = [
        (teams[key].usage, team_jobs.oldest[0], key)
        for key, team_jobs in waiting.items()
        if team_jobs.jobs and not (respect_quota and teams[key].full)
    ]
    heapq.heapify(heap)
    picked: list[QueuedJob] = []
    while heap and len(picked) < slots:
        _, _, key = heapq.heappop(heap)
        team_jobs, team = waiting[key], teams[key]
        index, job = team_jobs.jobs[team_jobs.next]
        team_jobs.next += 1
        taken.add(index)
        picked.append(job)
        team.charge += dispatch_charge * job.gpus
        team.running += 1
        if team_jobs.next == len(team_jobs.jobs) or (respect_quota and team.full):
            continue
        heapq.heappush(heap, (team.usage, team_jobs.oldest[team_jobs.next], key))
    return picked


def _teams(
    candidates: Sequence[QueuedJob], shares: Mapping[int, TeamShare], dispatch_charge: float
) -> dict[int, _Team]:
    keys = {job.team for job in candidates}
    return {key: _Team(key, shares.get(key), dispatch_charge) for key in keys}


def normalized_usage(
    shares: Mapping[int, TeamShare], dispatch_charge: float = DEFAULT_DISPATCH_CHARGE
) -> dict[int, float]:
    """Each team's charge per weight: the figure fair share orders teams by (lowest
    first); preemption takes GPUs only from a team ahead of the waiting one by it."""
    return {team: _Team(team, share, dispatch_charge).usage for team, share in shares.items()}


def plan_dispatch(
    candidates: Sequence[QueuedJob],
    shares: Mapping[int, TeamShare],
    free_slots: Mapping[str, int],
    dispatch_charge: float = DEFAULT_DISPATCH_CHARGE,
    class_order: Sequence[str] | None = None,
) -> list[tuple[QueuedJob, str]]:
    """Fill every free slot (GPU class -> count) in one pass, as (job, class) pairs.

    Each pick charges its team `dispatch_charge` before the next, so free slots are spread
    across teams. Classes are filled in `class_order` (the scheduler passes smallest memory
    first, so jobs that fit a small GPU take it and leave the large ones to jobs that need
    them), else in name order; the same inputs always give the same plan. The caller's
    shares are not modified.
    """
    _check_priorities(candidates)
    teams = _teams(candidates, shares, dispatch_charge)
    taken: set[int] = set()
    plan: list[tuple[QueuedJob, str]] = []
    order = [c for c in class_order if c in free_slots] if class_order else []
    order += sorted(c for c in free_slots if c not in order)
    for gpu_class in order:
        slots = free_slots[gpu_class]
        if slots <= 0:
            continue
        waiting = _group(candidates, taken, gpu_class)
        for job in _fill(waiting, teams, taken, slots, dispatch_charge, respect_quota=True):
            plan.append((job, gpu_class))
    return plan


def pick_next(
    candidates: Sequence[QueuedJob],
    shares: Mapping[int, TeamShare],
    gpu_class: str,
    dispatch_charge: float = DEFAULT_DISPATCH_CHARGE,
) -> QueuedJob | None:
    """The job to dispatch to one free slot of `gpu_class`, or None if no job can take it."""
    plan = plan_dispatch(candidates, shares, {gpu_class: 1}, dispatch_charge)
    return plan[0][0] if plan else None


def queue_order(
    candidates: Sequence[QueuedJob],
    shares: Mapping[int, TeamShare],
    dispatch_charge: float = DEFAULT_DISPATCH_CHARGE,
) -> list[QueuedJob]:
    """Every candidate in the order it would be dispatched if slots freed one at a time.

    Used to show a job's place in line. GPU classes are ignored (a position is an estimate),
    and so is max_running: by the time a team's later jobs come up, its running jobs will
    have ended.
    """
    _check_priorities(candidates)
    teams = _teams(candidates, shares, dispatch_charge)
    taken: set[int] = set()
    waiting = _group(candidates, taken, None)
    return _fill(waiting, teams, taken, len(candidates), dispatch_charge, respect_quota=False)


def waiting_for_worker(eligible: frozenset[str], online: Set[str]) -> str | None:
    """Why a queued job cannot start however the queue moves: no live worker of any class
    it may run on. None when one is online.

    An empty `eligible` is a job accepted while the pool knew no class that could hold it
    (no worker had registered and none was declared): it waits for one that can."""
    if eligible & online:
        return None
    if not eligible:
        return (
            "No worker of a fitting GPU class is online: the pool knows no class that can "
            "hold this job yet; it waits in line until such a worker registers"
        )
    return (
        f"No worker of a fitting GPU class ({', '.join(sorted(eligible))}) is online; "
        "the job waits in line until one is"
    )


def decayed_usage(
    buckets: Iterable[tuple[float, float]], now: float, half_life_seconds: float
) -> float:
    """Sum of GPU seconds from (ended_at, gpu_seconds) pairs, halved every half-life.

    Decay lets a team that used a lot last month compete on equal terms again after a
    while. A timestamp in the future (clock skew) counts in full, never more.
    """
    if not half_life_seconds > 0:
        raise ValueError(f"half_life_seconds must be > 0, got {half_life_seconds}")
    return sum(
        gpu_seconds * 0.5 ** (max(0.0, now - ended_at) / half_life_seconds)
        for ended_at, gpu_seconds in buckets
    )


def estimate_starts(
    positions: int, slot_free_in: Sequence[float], typical_job_seconds: float
) -> list[float]:
    """Seconds from now until each of the first `positions` jobs in line starts.

    Each slot frees after slot_free_in[i] seconds (0: free now); the next job in line takes
    the slot that frees first and holds it for `typical_job_seconds`. With no slots at all,
    no job has a start time: every entry is math.inf.
    """
    if positions <= 0:
        return []
    if not slot_free_in:
        return [math.inf] * positions
    free_at = [max(0.0, float(t)) for t in slot_free_in]
    heapq.heapify(free_at)
    starts: list[float] = []
    for _ in range(positions):
        start = heapq.heappop(free_at)
        starts.append(start)
        heapq.heappush(free_at, start + typical_job_seconds)
    return starts
