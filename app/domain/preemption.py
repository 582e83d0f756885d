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
* Waiting jobs are served longest-waiting first; each plan updates the holdings the
  next one sees.

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
) -> list[Preemption]:
    """The preemptions to make now. `host_gpus` maps each live host to (class, GPUs,
    GPUs free now); `weights` each team's fair-share weight (missing: 1)."""
    held: dict[tuple[int, str], int] = defaultdict(int)  # (team, class) -> GPUs held
    for job in running:
        if not job.stopping:
            held[job.team, job.gpu_class] += job.gpus
    # GPUs free now or being freed by a stopping victim, less those promised to a job
    # this pass planned for: what a waiting job can count on without a new preemption.
    spare = {host: free for host, (_, _, free) in host_gpus.items()}
    for job in running:
        if job.stopping and job.host in spare:
            spare[job.host] += job.gpus
    taken: set[int] = set()

    def total_weight(classes: frozenset[str]) -> float:
        """The weights of the teams with work on those classes: running there, or waiting
        for one of them."""
        active = {job.team for job in running if job.gpu_class in classes}
        active |= {job.team for job in waiting if job.eligible & classes}
        return sum(weights.get(team, 1.0) for team in active) or 1.0

    plans: list[Preemption] = []

    def holding(team: int, classes: frozenset[str]) -> int:
        return sum(held[team, c] for c in classes)

    def entitlement(team: int, classes: frozenset[str]) -> float:
        pool = sum(gpus for cls, gpus, _ in host_gpus.values() if cls in classes)
        return pool * weights.get(team, 1.0) / total_weight(classes)

    for job in sorted(waiting, key=lambda w: (-w.waited, w.key)):
        if job.waited < policy.wait_seconds:
            continue
        classes = job.eligible
        hosts = [
            h for h, (cls, gpus, _) in host_gpus.items() if cls in classes and gpus >= job.gpus
        ]
        if any(spare[h] >= job.gpus for h in hosts):
            continue  # it can start, or GPUs are already being freed for it
        mine = holding(job.team, classes)
        if mine >= entitlement(job.team, classes):
            continue
        my_level = mine / weights.get(job.team, 1.0)
        best: tuple | None = None
        for host in hosts:
            chosen = _victims_on(
                host,
                job,
                running,
                taken,
                max(0, spare[host]),
                classes,
                policy,
                weights,
                holding,
                entitlement,
                my_level,
            )
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
            held[victim.team, victim.gpu_class] -= victim.gpus
            spare[host] += victim.gpus
        spare[host] -= job.gpus
        held[job.team, host_gpus[host][0]] += job.gpus
        plans.append(Preemption(job.key, host, tuple(v.key for v in chosen)))
    return plans


def _victims_on(
    host,
    job,
    running,
    taken,
    free_now,
    classes,
    policy,
    weights,
    holding,
    entitlement,
    my_level,
):
    """The victims on `host` that give `job` its GPUs, in the policy's order; None when
    that host cannot."""

    def over(team: int) -> float:
        return holding(team, classes) - entitlement(team, classes)

    candidates = [
        r
        for r in running
        if r.host == host
        and r.key not in taken
        and not r.stopping
        and r.team != job.team
        and r.preemptible
        and r.preemptions < policy.max_preemptions
        and r.ran >= policy.min_run_seconds
        and over(r.team) > 0
    ]
    candidates.sort(key=lambda r: (_RANK[r.priority], -over(r.team), -r.started_at, r.key))
    chosen, freed = [], free_now
    losing: dict[int, int] = defaultdict(int)
    for victim in candidates:
        if freed >= job.gpus:
            break
        after = holding(victim.team, classes) - losing[victim.team] - victim.gpus
        if after / weights.get(victim.team, 1.0) < my_level:
            continue  # it would leave that team below where the waiting team is now
        chosen.append(victim)
        losing[victim.team] += victim.gpus
        freed += victim.gpus
    return chosen if freed >= job.gpus and chosen else None
