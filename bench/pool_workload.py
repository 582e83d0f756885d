"""The synthetic week bench/pool_sim.py schedules: a 32-GPU pool and ten teams' jobs.

The pool is 3 hosts of 8 x a100-40gb and 1 host of 8 x h100-80gb. The teams (weights
1,1,1,1,2,2,2,3,3,4) behave differently, because a fair-share policy is only tested by
teams that want different things:

* two heavy teams (weights 3 and 4) start 8-GPU runs lasting days at the start of the
  week and keep a stream of 2-4 GPU jobs queued;
* three bursty teams (weight 2) submit batches of 1-2 GPU sweeps a few times a week;
* one steady team (weight 3) submits 2-4 GPU jobs around the clock;
* four light teams (weight 1) submit an occasional 1-GPU job.

Durations are lognormal (minutes to days), clipped to [5 min, 6 days]. A job's estimate
(what it tells the scheduler) is its true duration times lognormal noise, because the
scheduler only ever knows an estimate. A fifth of the jobs (and one heavy team's long
run) need 80 GB GPUs; the rest fit either class. Everything comes from one seeded RNG,
so a seed gives the same week every time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

A100, H100 = "a100-40gb", "h100-80gb"
CLASS_ORDER = (A100, H100)
"""Smallest memory first, as the scheduler passes it."""
HOSTS = (("a100-0", A100, 8), ("a100-1", A100, 8), ("a100-2", A100, 8), ("h100-0", H100, 8))
"""(host id, GPU class, GPUs)."""

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
ESTIMATE_SIGMA = 0.3
"""Lognormal noise of a job's estimate against its true duration (about +-35 %)."""


@dataclass(frozen=True)
class JobSpec:
    key: int
    team: int
    gpus: int
    priority: str
    submit: float
    work: float
    """Seconds of training it needs (its true duration without interruptions)."""
    expected: float
    """Its estimate of `work`, what the scheduler sees."""
    eligible: frozenset[str]


@dataclass(frozen=True)
class TeamProfile:
    name: str
    weight: float
    kind: str
    """light, bursty, steady or heavy: sets the team's group in the report."""
    rate_per_day: float
    """Poisson arrivals per day (jobs or bursts, see burst)."""
    sizes: tuple[tuple[int, float], ...]
    """(GPUs, probability)."""
    median_hours: float
    sigma: float
    burst: tuple[int, int] = (1, 1)
    """Jobs per arrival: uniform in [lo, hi]."""
    long_runs: int = 0
    """8-GPU runs of several days submitted in the first hour."""
    long_run_class: frozenset[str] = frozenset({A100, H100})


TEAMS = (
    TeamProfile("light-a", 1, "light", 3, ((1, 1.0),), 1.5, 1.0),
    TeamProfile("light-b", 1, "light", 2, ((1, 0.8), (2, 0.2)), 2.0, 1.0),
    TeamProfile("light-c", 1, "light", 4, ((1, 1.0),), 0.75, 1.0),
    TeamProfile("light-d", 1, "light", 1.5, ((1, 0.7), (2, 0.3)), 3.0, 1.0),
    TeamProfile("burst-e", 2, "bursty", 0.5, ((1, 0.7), (2, 0.3)), 1.0, 0.8, burst=(10, 30)),
    TeamProfile("burst-f", 2, "bursty", 0.6, ((1, 0.5), (2, 0.5)), 2.0, 0.8, burst=(8, 20)),
    TeamProfile("burst-g", 2, "bursty", 0.3, ((2, 0.5), (4, 0.5)), 3.0, 0.8, burst=(5, 12)),
    TeamProfile("steady-h", 3, "steady", 10, ((2, 0.5), (4, 0.5)), 5.0, 0.9),
    TeamProfile(
        "heavy-i",
        3,
        "heavy",
        4,
        ((2, 0.4), (4, 0.4), (8, 0.2)),
        6.0,
        1.0,
        long_runs=1,
        long_run_class=frozenset({H100}),
    ),
    TeamProfile("heavy-j", 4, "heavy", 5, ((2, 0.3), (4, 0.5), (8, 0.2)), 6.0, 1.0, long_runs=2),
)
PRIORITY_MIX = (("low", 0.2), ("normal", 0.65), ("high", 0.15))
NEEDS_H100 = 0.2
"""Share of the ordinary jobs that need 80 GB GPUs."""


def _pick(rng: random.Random, table: tuple[tuple[object, float], ...]):
    return rng.choices([value for value, _ in table], [p for _, p in table])[0]


def _duration(rng: random.Random, median_hours: float, sigma: float) -> float:
    seconds = median_hours * HOUR * math.exp(rng.gauss(0.0, sigma))
    return min(6 * DAY, max(5 * MINUTE, seconds))


def make_workload(days: float, seed: int, teams: tuple[TeamProfile, ...] = TEAMS) -> list[JobSpec]:
    """Every job the teams submit in `days`, in submit order, keys 1..n."""
    rng = random.Random(seed)
    raw: list[tuple[float, int, int, str, float, frozenset[str]]] = []
    both = frozenset({A100, H100})
    for team, profile in enumerate(teams):
        for _ in range(profile.long_runs):
            work = rng.uniform(3.5, 6.0) * DAY
            raw.append((rng.uniform(0, HOUR), team, 8, "normal", work, profile.long_run_class))
        t = 0.0
        while True:
            t += rng.expovariate(profile.rate_per_day / DAY)
            if t >= days * DAY:
                break
            for _ in range(rng.randint(*profile.burst)):
                submit = t + rng.uniform(0, 10 * MINUTE) if profile.burst[1] > 1 else t
                eligible = frozenset({H100}) if rng.random() < NEEDS_H100 else both
                raw.append(
                    (
                        submit,
                        team,
                        _pick(rng, profile.sizes),
                        _pick(rng, PRIORITY_MIX),
                        _duration(rng, profile.median_hours, profile.sigma),
                        eligible,
                    )
                )
    raw.sort(key=lambda r: (r[0], r[1]))
    return [
        JobSpec(
            key=i + 1,
            team=team,
            gpus=gpus,
            priority=priority,
            submit=submit,
            work=work,
            expected=work * math.exp(rng.gauss(0.0, ESTIMATE_SIGMA)),
            eligible=eligible,
        )
        for i, (submit, team, gpus, priority, work, eligible) in enumerate(raw)
        if submit < days * DAY
    ]
