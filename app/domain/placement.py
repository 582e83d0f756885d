"""Gang placement: which waiting jobs start now on which host, and which wait with a
reservation, when jobs ask for several GPUs of one host.

Policy
------
* Jobs are taken in fair-share order (app.domain.scheduling: the team with the least
  normalized usage next, a team's jobs by priority then age); a job on N GPUs charges its
  team N times a 1-GPU job's.
* A job starts only when one host of a class it may run on has all N GPUs free at once
  (gang: never a partial set). Among the hosts that can take it: smaller-memory classes
  first (as `class_order` says), then the host left with the fewest free GPUs (best
  fit: whole hosts stay whole for the jobs that need them), then the host id.
* A job that cannot start gets a *reservation*: the eligible host where N GPUs free
  soonest (each running job is expected to end at its estimate), if no other job holds a
  reservation there. Later jobs in the pass may still take that host's free GPUs
  (*backfill*), but only if the reservation's start does not move: the job is expected to
  end by then, or it takes GPUs the reservation does not need. This keeps a big job from
  waiting forever behind a stream of small ones, while small ones still fill idle GPUs.
* A host with no reservation is filled without this check; a job whose size no eligible
  host has is left waiting with that reason.

Everything here is pure: the caller (app.services.scheduler) loads hosts and jobs and
persists what it decides. Each pass recomputes reservations from scratch, so a
reservation lives exactly as long as its job stays first in line for it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from app.domain.scheduling import (
    DEFAULT_DISPATCH_CHARGE,
    QueuedJob,
    TeamShare,
    _check_priorities,
    _group,
    _teams,
)


@dataclass
class Host:
    """One worker host: its class and, for each of its GPUs, the seconds until it frees
    (0: free now; math.inf: never, a draining host's)."""

    id: str
    gpu_class: str
    free_in: list[float]

    @property
    def free_now(self) -> int:
        return sum(1 for t in self.free_in if t <= 0)


@dataclass(frozen=True)
class Reservation:
    job: int
    host: str
    gpus: int
    starts_in: float
    """Seconds from now until the host is expected to have the job's GPUs free."""


@dataclass
class Placement:
    started: list[tuple[QueuedJob, str]] = field(default_factory=list)
    """(job, host id) pairs to dispatch now."""
    reservations: list[Reservation] = field(default_factory=list)
    waiting: dict[int, str] = field(default_factory=dict)
    """Job key -> why a job the pass looked at did not start (not every candidate)."""


def _ready_at(free_in: Sequence[float], gpus: int) -> float:
    """When `gpus` of a host's GPUs are free at once: the gpus-th soonest to free."""
    return sorted(free_in)[gpus - 1] if gpus <= len(free_in) else math.inf


def _take(host: Host, gpus: int, seconds: float) -> list[float]:
    """The host's free_in after `gpus` of its free GPUs are taken for `seconds`."""
    after, left = list(host.free_in), gpus
    for i, t in enumerate(after):
        if left and t <= 0:
            after[i], left = seconds, left - 1
    return after


def plan_placement(
    candidates: Sequence[QueuedJob],
    shares: Mapping[int, TeamShare],
    hosts: Sequence[Host],
    *,
    typical_job_seconds: float,
    dispatch_charge: float = DEFAULT_DISPATCH_CHARGE,
    class_order: Sequence[str] = (),
    earmarks: Mapping[int, str] | None = None,
) -> Placement:
    """Start what can start on `hosts` now, in fair-share order, with gang reservations
    and conservative backfill as the module docstring says. Neither the caller's hosts
    nor its shares are modified.

    `earmarks` (job key -> host id): jobs a preemption freed GPUs for (app.domain.
    preemption). They go first, on that host: started if its GPUs are free, else holding
    a reservation there, so the GPUs the preemption frees are not taken by another job;
    an earmark on a host that will never free them is ignored."""
    _check_priorities(candidates)
    for job in candidates:
        if job.gpus < 1:
            raise ValueError(f"job {job.key} asks for {job.gpus} GPUs; at least 1")
    rank = {name: i for i, name in enumerate(class_order)}
    free_in = {h.id: list(h.free_in) for h in hosts}
    by_id = {h.id: h for h in hosts}
    reserved: dict[str, Reservation] = {}
    teams = _teams(candidates, shares, dispatch_charge)
    waiting = _group(candidates, set(), None)
    plan = Placement()

    def fits_without_delay(host: str, job: QueuedJob, seconds: float) -> bool:
        booking = reserved.get(host)
        if booking is None or seconds <= booking.starts_in:
            return True
        after = _take(Host(host, "", free_in[host]), job.gpus, seconds)
        return _ready_at(after, booking.gpus) <= booking.starts_in

    def host_order(host: Host) -> tuple:
        return (rank.get(host.gpu_class, len(rank)), host.gpu_class, host.id)

    def start(job: QueuedJob, host_id: str, seconds: float) -> None:
        free_in[host_id] = _take(Host(host_id, "", free_in[host_id]), job.gpus, seconds)
        plan.started.append((job, host_id))
        teams[job.team].charge += dispatch_charge * job.gpus
        teams[job.team].running += 1

    handled: set[int] = set()
    for job in sorted(candidates, key=lambda j: j.key):
        host = by_id.get((earmarks or {}).get(job.key, ""))
        if host is None or host.gpu_class not in job.eligible or teams[job.team].full:
            continue
        if math.isinf(_ready_at(free_in[host.id], job.gpus)):
            continue  # that host will not free them (draining): placed as any other job
        handled.add(job.key)
        seconds = job.expected_seconds or typical_job_seconds
        if sum(1 for t in free_in[host.id] if t <= 0) >= job.gpus:
            start(job, host.id, seconds)
            continue
        starts_in = _ready_at(free_in[host.id], job.gpus)
        booking = Reservation(job.key, host.id, job.gpus, starts_in)
        reserved[host.id] = booking
        plan.reservations.append(booking)
        plan.waiting[job.key] = (
            f"waits for {job.gpus} GPUs of {host.id}, freed for it by a preemption"
        )

    heap = [
        (teams[key].usage, team_jobs.oldest[0], key)
        for key, team_jobs in waiting.items()
        if team_jobs.jobs and not teams[key].full
    ]
    heapq.heapify(heap)
    while heap:
        _, _, key = heapq.heappop(heap)
        team_jobs, team = waiting[key], teams[key]
        _, job = team_jobs.jobs[team_jobs.next]
        team_jobs.next += 1
        if job.key in handled:
            if team_jobs.next < len(team_jobs.jobs) and not team.full:
                heapq.heappush(heap, (team.usage, team_jobs.oldest[team_jobs.next], key))
            continue
        seconds = job.expected_seconds or typical_job_seconds
        eligible = sorted((h for h in hosts if h.gpu_class in job.eligible), key=host_order)
        fitting = [
            h
            for h in eligible
            if sum(1 for t in free_in[h.id] if t <= 0) >= job.gpus
            and fits_without_delay(h.id, job, seconds)
        ]
        if fitting:
            best = min(
                fitting,
                key=lambda h: (
                    rank.get(h.gpu_class, len(rank)),
                    sum(1 for t in free_in[h.id] if t <= 0) - job.gpus,
                    h.id,
                ),
            )
            start(job, best.id, seconds)
        else:
            plan.waiting[job.key] = _reserve(job, eligible, free_in, reserved, plan)
        if team_jobs.next < len(team_jobs.jobs) and not team.full:
            heapq.heappush(heap, (team.usage, team_jobs.oldest[team_jobs.next], key))
    return plan


def _reserve(
    job: QueuedJob,
    eligible: list[Host],
    free_in: dict[str, list[float]],
    reserved: dict[str, Reservation],
    plan: Placement,
) -> str:
    """Reserve the host where the job's GPUs free soonest, and say why it waits."""
    classes = ", ".join(sorted(job.eligible)) or "none known"
    big_enough = [h for h in eligible if len(h.free_in) >= job.gpus]
    if not big_enough:
        return (
            f"needs {job.gpus} GPUs of one host; no live host of its classes ({classes}) "
            f"has {job.gpus}"
        )
    open_hosts = [h for h in big_enough if h.id not in reserved]
    if not open_hosts:
        return (
            f"waits for {job.gpus} GPUs of one host ({classes}); every host that has "
            "them is reserved for a job ahead of it"
        )
    best = min(open_hosts, key=lambda h: _ready_at(free_in[h.id], job.gpus))
    starts_in = _ready_at(free_in[best.id], job.gpus)
    if math.isinf(starts_in):
        return f"waits for {job.gpus} GPUs of one host ({classes}); those hosts are draining"
    booking = Reservation(job.key, best.id, job.gpus, starts_in)
    reserved[best.id] = booking
    plan.reservations.append(booking)
    return (
        f"waits for {job.gpus} GPUs of one host: reserved on {best.id} ({best.gpu_class}), "
        f"expected free in about {max(1, round(starts_in / 60))} min; smaller jobs fill "
        "its GPUs only if they end before then"
    )
