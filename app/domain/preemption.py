"""Preemption by fair share: which running jobs the scheduler pauses (at a full
checkpoint, to resume automatically later) so that a team below its share can start.

Policy
------
* Shares here are of GPUs held *now*. Among the teams with jobs running on or waiting
  for a set of classes (a waiting job's), a team's entitlement is its weight's part of
  those classes' GPUs::

      entitlement(team) = gpus_in_classes * weight(team) / sum(weight of active teams)

* A waiting job *qualifies* when it has waited at least `wait_seconds`, cannot start now,
  its team holds fewer GPUs of the job's classes than its entitlement, and no earlier
  preemption is already freeing GPUs for it (a victim that is still stopping).
* A running job is a *victim candidate* when it runs on a host of one of the waiting
  job's classes, its team holds more than its entitlement, and neither the job nor its
  team is marked non-preemptible, it has been preempted fewer than `max_preemptions`
  times, and it has run at least `min_run_seconds` since its start or last resume.
  Taking it must not leave its team holding less (per weight) than the waiting team
  holds now, so two teams never trade GPUs back and forth for nothing.
* Victims are chosen on one host, enough to give the waiting job all its GPUs there:
  lowest priority first (`high` last), then the team furthest over its share, then the
  job started most recently, then the key. The host needing the fewest and
  lowest-priority victims wins.
* With `usage` (the service passes it): the victim's team must also be ahead of the
  waiting team in fair-share usage (decayed GPU time per weight, as placement orders
  teams) by a margin, the usage the waiting job adds in its protected first
  `min_run_seconds` (its GPUs times M, per its team's weight). So the GPUs a preemption
  frees go to the team placement serves first, and two teams cannot take GPUs back and
  forth: after a swap the taker's usage grows, and the other team preempts back only
  once it is behind again by more than that margin (time-slicing paced by usage, never
  faster than M; two teams at equal usage do not trade at all).
* `earmarks` (the service passes them): a job a preemption is already freeing GPUs for
  is served (it is not planned for again), and the GPUs promised to it on its host are
  not spare for any other job.
* Waiting jobs are served longest-waiting first; each plan updates the holdings the
  next one sees. When nothing running may be taken at all, the queue is not looked at.

Pure: the caller (app.services.preemptions) loads the pool and persists the pauses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.domain.scheduling import PRIORITIES

_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class PreemptionPolicy:
    wait_seconds: float
    """A below-share team's job must have waited this long before anything is preempted."""
    max_preemptions: int
    """K: a job is preempted at most this many times."""
    min_run_seconds: float
    """M: never within this long of a job's start or last resume."""


@dataclass(frozen=True)
class Waiting:
    key: int
    team: int
    gpus: int
    eligible: frozenset[str]
    waited: float
    """Seconds it has been waiting to (re)start."""


@dataclass(frozen=True)
class Running:
    key: int
    team: int
    host: str
    gpu_class: str
    gpus: int
    priority: str
    ran: float
    """Seconds since its start or last resume."""
    started_at: float
    preemptions: int
    preemptible: bool
    """False when the job or its team is marked non-preemptible (or it is an export)."""
    stopping: bool = False
    """Already told to stop (a preemption in progress): its GPUs are being freed."""


@dataclass(frozen=True)
class Preemption:
    for_job: int
    host: str
    victims: tuple[int, ...]


def plan_preemptions(
    waiting: Sequence[Waiting],
    running: Sequence[Running],
    host_gpus: Mapping[str, tuple[str, int, int]],
    weights: Mapping[int, float],
    policy: PreemptionPolicy,
    usage: Mapping[int, float] | None = None,
    earmarks: Mapping[int, tuple[str, int]] | None = None,
) -> list[Preemption]:
    """The preemptions to make now. `host_gpus` maps each live host to (class, GPUs,
    GPUs free now); `weights` each team's fair-share weight (missing: 1); `usage` each
    team's normalized fair-share usage as placement orders teams by (missing: 0; None:
    not considered); `earmarks` each waiting job a preemption is freeing GPUs for, as
    (host, GPUs)."""
    takeable = movable(running, policy)
    if not takeable:
        return []  # nothing may be taken: no need to look at the queue at all
    earmarks = earmarks or {}
    pool = _Pool(waiting, running, host_gpus, weights, earmarks)
    taken: set[int] = set()
    plans: list[Preemption] = []
    for job in sorted(waiting, key=lambda w: (-w.waited, w.key)):
        if job.waited < policy.wait_seconds or job.key in earmarks:
            continue
        classes = job.eligible
        hosts = [
            h for h, (cls, gpus, _) in host_gpus.items() if cls in classes and gpus >= job.gpus
        ]
        if any(pool.spare[h] >= job.gpus for h in hosts):
            continue  # it can start, or GPUs are already being freed for it
        mine = pool.holding(job.team, classes)
        if mine >= pool.entitlement(job.team, classes):
            continue
        my_level = mine / weights.get(job.team, 1.0)
        margin = job.gpus * policy.min_run_seconds / weights.get(job.team, 1.0)
        best: tuple | None = None
        for host in hosts:
            candidates = [
                r
                for r in takeable
                if r.host == host
                and r.key not in taken
                and _may_take(r, job, pool.over(r.team, classes), usage, margin)
            ]
            chosen = pool.victims(job, host, candidates, classes, my_level)
            if chosen is None:
                continue
            worst = max(_RANK[v.priority] for v in chosen)
            score = (worst, len(chosen), host)
            if best is None or score < best[0]:
                best = (score, host, chosen)
        if best is None:
            continue
        _, host, chosen = best
        for victim in chosen:
            taken.add(victim.key)
            pool.move(victim.team, victim.gpu_class, -victim.gpus, host, victim.gpus)
        pool.move(job.team, host_gpus[host][0], job.gpus, host, -job.gpus)
        plans.append(Preemption(job.key, host, tuple(v.key for v in chosen)))
    return plans


def movable(running: Sequence[Running], policy: PreemptionPolicy) -> list[Running]:
    """The runs the policy's limits and marks let it take at all, whoever waits: running
    (not already stopping), preemptible, preempted fewer than K times, past M."""
    return [
        r
        for r in running
        if not r.stopping
        and r.preemptible
        and r.preemptions < policy.max_preemptions
        and r.ran >= policy.min_run_seconds
    ]


def _may_take(
    victim: Running, job: Waiting, over: float, usage: Mapping[int, float] | None, margin: float
) -> bool:
    """Another team's run, that team above its share here and (with `usage`) ahead of the
    waiting team in fair-share usage by more than `margin`."""
    if victim.team == job.team or over <= 0:
        return False
    return usage is None or usage.get(victim.team, 0.0) > usage.get(job.team, 0.0) + margin


class _Pool:
    """GPUs held per team and class, and spare per host, as the pass plans preemptions."""

    def __init__(self, waiting, running, host_gpus, weights, earmarks) -> None:
        self.waiting, self.running, self.weights = waiting, running, weights
        self.sizes = {cls: 0 for cls, _, _ in host_gpus.values()}
        for cls, gpus, _ in host_gpus.values():
            self.sizes[cls] += gpus
        self.held: dict[tuple[int, str], int] = defaultdict(int)
        for job in running:
            if not job.stopping:
                self.held[job.team, job.gpu_class] += job.gpus
        # GPUs free now or being freed by a stopping victim, less those promised to a job
        # this pass planned for: what a waiting job can count on without a new preemption.
        self.spare = {host: free for host, (_, _, free) in host_gpus.items()}
        for job in running:
            if job.stopping and job.host in self.spare:
                self.spare[job.host] += job.gpus
        for host, gpus in earmarks.values():  # promised to the job they are freed for
            if host in self.spare:
                self.spare[host] -= gpus
        self._weights_on: dict[frozenset[str], float] = {}

    def move(self, team: int, gpu_class: str, gpus: int, host: str, spare: int) -> None:
        self.held[team, gpu_class] += gpus
        self.spare[host] += spare

    def holding(self, team: int, classes: frozenset[str]) -> int:
        return sum(self.held[team, c] for c in classes)

    def entitlement(self, team: int, classes: frozenset[str]) -> float:
        if classes not in self._weights_on:
            # The teams with work on those classes: running there, or waiting for one.
            active = {job.team for job in self.running if job.gpu_class in classes}
            active |= {job.team for job in self.waiting if job.eligible & classes}
            self._weights_on[classes] = sum(self.weights.get(t, 1.0) for t in active) or 1.0
        pool = sum(self.sizes.get(c, 0) for c in classes)
        return pool * self.weights.get(team, 1.0) / self._weights_on[classes]

    def over(self, team: int, classes: frozenset[str]) -> float:
        return self.holding(team, classes) - self.entitlement(team, classes)

    def victims(self, job, host, candidates, classes, my_level):
        """Victims among `candidates` (on `host`) that give `job` its GPUs, in the policy's
        order; None when that host cannot."""
        candidates = sorted(
            candidates,
            key=lambda r: (_RANK[r.priority], -self.over(r.team, classes), -r.started_at, r.key),
        )
        chosen, freed = [], max(0, self.spare[host])
        losing: dict[int, int] = defaultdict(int)
        for victim in candidates:
            if freed >= job.gpus:
                break
            after = self.holding(victim.team, classes) - losing[victim.team] - victim.gpus
            if after / self.weights.get(victim.team, 1.0) < my_level:
                continue  # it would leave that team below where the waiting team is now
            chosen.append(victim)
            losing[victim.team] += victim.gpus
            freed += victim.gpus
        return chosen if freed >= job.gpus and chosen else None
