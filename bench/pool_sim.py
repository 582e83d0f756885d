"""Lathe's pool policy over a synthetic week: the real `plan_placement` and
`plan_preemptions` drive a discrete-event simulation of a 32-GPU pool, with and without
preemption, and the report says who got the GPUs and who waited.

Every pass (each `pass_seconds` of simulated time) does what the scheduler service does
(app/services/scheduler.py, app/services/preemptions.py): TeamShares from decayed usage of
ended runs (24 h half-life) and the runs in progress, hosts' per-GPU free_in from each
running job's estimate, `plan_placement` over every waiting job with the earmarks of the
jobs preemptions freed GPUs for, then (preemption variant) `plan_preemptions` with each
team's normalized fair-share usage, earmarking each freed host for its job until that job
starts (as lifecycle.dispatch clears it). A preempted job keeps its GPUs for
`checkpoint_seconds` while it writes a full checkpoint (so it loses no trained work), then
goes back in line keeping its age; each resume costs `restart_seconds` of GPU time before
training continues. The workload is bench/pool_workload.py.

    python -m bench.pool_sim [--days 7] [--seed 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from app.domain.placement import Host, plan_placement
from app.domain.preemption import PreemptionPolicy, Running, Waiting, plan_preemptions
from app.domain.scheduling import QueuedJob, TeamShare, decayed_usage, normalized_usage
from app.services.preemptions import WAITING_PER_TEAM
from bench.pool_workload import (
    A100,
    CLASS_ORDER,
    DAY,
    H100,
    HOSTS,
    HOUR,
    MINUTE,
    TEAMS,
    JobSpec,
    make_workload,
)

DEFAULT_POLICY = PreemptionPolicy(
    wait_seconds=15 * MINUTE, max_preemptions=3, min_run_seconds=30 * MINUTE
)
MIN_REMAINING = 60.0
"""free_in of a GPU whose job has outrun its estimate: it is busy, so never 0 (0 means free
now to plan_placement); the scheduler guesses it ends within the minute."""


class Phase(StrEnum):
    """Where a simulated job is. The simulation's own states: a job told to stop is still
    on its GPUs while it checkpoints, which no app.domain.jobs.JobStatus says alone."""

    FUTURE = "future"  # not submitted yet
    IN_LINE = "in_line"  # waiting to start or resume
    TRAINING = "training"
    CHECKPOINTING = "checkpointing"  # preempted, writing its checkpoint, GPUs still held
    DONE = "done"


@dataclass
class SimConfig:
    days: float = 7.0
    seed: int = 1
    pass_seconds: float = 30.0
    half_life_seconds: float = 24 * HOUR
    dispatch_charge: float = 300.0
    typical_job_seconds: float = 600.0
    preemption: PreemptionPolicy | None = None
    checkpoint_seconds: float = 60.0
    restart_seconds: float = 120.0


@dataclass
class RunRecord:
    """One stretch of a job on GPUs, from start or resume to its end or stop."""

    job: int
    team: int
    host: str
    gpus: tuple[int, ...]
    start: float
    end: float | None = None
    overhead: float = 0.0
    """Restart seconds at its start (0 on a first start)."""
    stopped: bool = False
    """Ended by a preemption rather than by finishing."""
    preempted_before: int = 0
    """Times the job had been preempted when this run began (K of them: it cannot be again)."""


@dataclass
class PreemptionRecord:
    at: float
    victim: int
    victim_team: int
    ran: float
    """Seconds since the victim's start or last resume, when it was told to stop."""
    earlier: int
    """Times the victim had been preempted before this one."""
    for_job: int
    for_team: int
    host: str
    victim_usage: float = 0.0
    for_usage: float = 0.0
    """The two teams' normalized fair-share usage handed to plan_preemptions."""
    served_at: float | None = None
    """When `for_job` next started on `host` (None: it started elsewhere, or never)."""


@dataclass
class SimJob:
    spec: JobSpec
    phase: Phase = Phase.FUTURE
    done: float = 0.0
    """Seconds of training done before the current run."""
    since: float = 0.0
    """What the service's `waited` counts from: submission, or the last preemption."""
    first_start: float | None = None
    finished_at: float | None = None
    run: RunRecord | None = None
    stop_at: float = 0.0
    preemptions: int = 0
    runs: int = 0
    restart: float = 0.0
    """Restart seconds a resume costs (the config's, kept here for `queued_job`)."""
    queued: QueuedJob | None = None
    """The QueuedJob handed to plan_placement, rebuilt after each stop."""

    def queued_job(self) -> QueuedJob:
        if self.queued is None:
            spec = self.spec
            resume = self.restart if self.done > 0 else 0.0
            self.queued = QueuedJob(
                key=spec.key,
                team=spec.team,
                priority=spec.priority,
                created_at=spec.submit,
                eligible=spec.eligible,
                gpus=spec.gpus,
                expected_seconds=max(MIN_REMAINING, spec.expected - self.done) + resume,
            )
        return self.queued


@dataclass
class SimResult:
    config: SimConfig
    jobs: list[SimJob]
    runs: list[RunRecord] = field(default_factory=list)
    preemptions: list[PreemptionRecord] = field(default_factory=list)
    passes: int = 0
    placement_calls: int = 0
    placement_seconds: float = 0.0
    preemption_calls: int = 0
    preemption_seconds: float = 0.0
    """Wall-clock seconds inside plan_placement and plan_preemptions."""
    seconds: float = 0.0
    """Wall-clock seconds the simulation took."""


class Pool:
    """The pool's state between passes; `advance` applies events, `schedule` is one pass."""

    def __init__(self, config: SimConfig, workload: list[JobSpec]) -> None:
        self.config = config
        self.jobs = {spec.key: SimJob(spec, restart=config.restart_seconds) for spec in workload}
        self.slots = {host: [None] * gpus for host, _, gpus in HOSTS}
        self.classes = {host: cls for host, cls, _ in HOSTS}
        self.weights = {team: profile.weight for team, profile in enumerate(TEAMS)}
        self.usage: dict[int, tuple[float, float]] = {}  # team -> (updated_at, gpu seconds)
        self.events: list[tuple[float, int, str, int, int]] = []
        self.seq = 0
        self.waiting: dict[int, SimJob] = {}
        self.active: dict[int, SimJob] = {}  # training or checkpointing
        self.result = SimResult(config, list(self.jobs.values()))
        self.pending_serve: dict[int, list[PreemptionRecord]] = defaultdict(list)
        self.earmarks: dict[int, str] = {}
        """Job key -> the host a preemption freed for it (the service's
        Job.earmarked_worker): set when it preempts, cleared when the job starts."""
        for job in self.jobs.values():
            self._push(job.spec.submit, "arrive", job)

    def _push(self, at: float, kind: str, job: SimJob) -> None:
        """An event for the job's current run (a stale one, of an earlier run, is ignored)."""
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, job.spec.key, job.runs))

    # Events ------------------------------------------------------------------------------

    def advance(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            at, _, kind, key, run = heapq.heappop(self.events)
            job = self.jobs[key]
            if run != job.runs:
                continue
            if kind == "arrive":
                job.phase, job.since = Phase.IN_LINE, at
                self.waiting[key] = job
            elif kind == "end" and job.phase in (Phase.TRAINING, Phase.CHECKPOINTING):
                self._release(job, at)
                job.phase, job.finished_at = Phase.DONE, at
            elif kind == "stop" and job.phase == Phase.CHECKPOINTING:
                run = job.run
                job.done = min(job.spec.work, job.done + max(0.0, at - run.start - run.overhead))
                run.stopped = True
                self._release(job, at)
                job.phase, job.queued = Phase.IN_LINE, None  # resume_preempted: back in line
                self.waiting[key] = job

    def _ends_at(self, job: SimJob) -> float:
        return job.run.start + job.run.overhead + (job.spec.work - job.done)

    def _release(self, job: SimJob, at: float) -> None:
        run = job.run
        run.end = at
        for gpu in run.gpus:
            assert self.slots[run.host][gpu] == job.spec.key
            self.slots[run.host][gpu] = None
        del self.active[job.spec.key]
        updated, value = self.usage.get(job.spec.team, (at, 0.0))
        value = decayed_usage([(updated, value)], at, self.config.half_life_seconds)
        self.usage[job.spec.team] = (at, value + (at - run.start) * job.spec.gpus)

    # One pass ----------------------------------------------------------------------------

    def schedule(self, now: float) -> None:
        self.result.passes += 1
        if self.waiting and any(None in gpus for gpus in self.slots.values()):
            self._place(now)  # (nothing can start, and placement keeps nothing, otherwise)
        if self.config.preemption is not None and self.waiting:
            self._preempt(now)

    def _shares(self, now: float) -> dict[int, TeamShare]:
        """As app.services.pool.team_shares: a preempted run still checkpointing is paused,
        not running, so it is charged when it stops, not while it stops."""
        shares = {
            team: TeamShare(
                team=team,
                weight=weight,
                recent_gpu_seconds=decayed_usage(
                    [self.usage.get(team, (now, 0.0))], now, self.config.half_life_seconds
                ),
            )
            for team, weight in self.weights.items()
        }
        for job in self.active.values():
            if job.phase == Phase.TRAINING:
                share = shares[job.spec.team]
                share.running.append(now - job.run.start)
                share.running_gpus.append(job.spec.gpus)
        return shares

    def _free_in(self, key: int | None, now: float) -> float:
        if key is None:
            return 0.0
        job = self.jobs[key]
        if job.phase == Phase.CHECKPOINTING:
            return job.stop_at - now
        run = job.run
        expected_end = run.start + run.overhead + (job.spec.expected - job.done)
        return max(MIN_REMAINING, expected_end - now)

    def _place(self, now: float) -> None:
        hosts = [
            Host(host, self.classes[host], [self._free_in(k, now) for k in gpus])
            for host, gpus in self.slots.items()
        ]
        began = time.perf_counter()
        plan = plan_placement(
            [job.queued_job() for job in self.waiting.values()],
            self._shares(now),
            hosts,
            typical_job_seconds=self.config.typical_job_seconds,
            dispatch_charge=self.config.dispatch_charge,
            class_order=CLASS_ORDER,
            earmarks=self.earmarks,
        )
        self.result.placement_calls += 1
        self.result.placement_seconds += time.perf_counter() - began
        for queued, host in plan.started:
            self._start(self.jobs[queued.key], host, now)

    def _start(self, job: SimJob, host: str, now: float) -> None:
        slots = self.slots[host]
        free = [i for i, key in enumerate(slots) if key is None]
        if len(free) < job.spec.gpus:
            raise AssertionError(f"job {job.spec.key} placed on {host} with {len(free)} free")
        gpus = tuple(free[: job.spec.gpus])
        for gpu in gpus:
            slots[gpu] = job.spec.key
        overhead = self.config.restart_seconds if job.done > 0 else 0.0
        job.runs += 1
        job.run = RunRecord(
            job.spec.key,
            job.spec.team,
            host,
            gpus,
            now,
            overhead=overhead,
            preempted_before=job.preemptions,
        )
        self.result.runs.append(job.run)
        job.phase = Phase.TRAINING
        if job.first_start is None:
            job.first_start = now
        del self.waiting[job.spec.key]
        self.active[job.spec.key] = job
        self.earmarks.pop(job.spec.key, None)  # lifecycle.dispatch: placed, nothing held
        self._push(self._ends_at(job), "end", job)
        for record in self.pending_serve.pop(job.spec.key, []):
            if record.host == host:
                record.served_at = now

    def _preempt(self, now: float) -> None:
        """app.services.preemptions.preempt_for_fair_share: each team's WAITING_PER_TEAM
        jobs that have waited longest (at least the policy's wait), every run on GPUs, and
        each team's normalized usage from the same TeamShares placement orders teams by."""
        policy = self.config.preemption
        per_team: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for key, job in self.waiting.items():
            if now - job.since >= policy.wait_seconds:
                per_team[job.spec.team].append((job.since, key))
        old_enough = sorted(
            first for team in per_team.values() for first in sorted(team)[:WAITING_PER_TEAM]
        )
        if not old_enough:
            return
        waiting = []
        for since, key in old_enough:
            spec = self.jobs[key].spec
            waiting.append(Waiting(key, spec.team, spec.gpus, spec.eligible, now - since))
        running = [
            Running(
                key=key,
                team=job.spec.team,
                host=job.run.host,
                gpu_class=self.classes[job.run.host],
                gpus=job.spec.gpus,
                priority=job.spec.priority,
                ran=now - job.run.start,
                started_at=job.run.start,
                preemptions=job.preemptions,
                preemptible=True,
                stopping=job.phase == Phase.CHECKPOINTING,
            )
            for key, job in self.active.items()
        ]
        host_gpus = {
            host: (self.classes[host], len(gpus), gpus.count(None))
            for host, gpus in self.slots.items()
        }
        usage = normalized_usage(self._shares(now), self.config.dispatch_charge)
        began = time.perf_counter()
        earmarks = {key: (host, self.jobs[key].spec.gpus) for key, host in self.earmarks.items()}
        plans = plan_preemptions(waiting, running, host_gpus, self.weights, policy, usage, earmarks)
        self.result.preemption_calls += 1
        self.result.preemption_seconds += time.perf_counter() - began
        for plan in plans:
            target = self.jobs[plan.for_job]
            for key in plan.victims:
                victim = self.jobs[key]
                record = PreemptionRecord(
                    now,
                    key,
                    victim.spec.team,
                    now - victim.run.start,
                    victim.preemptions,
                    plan.for_job,
                    target.spec.team,
                    plan.host,
                    usage[victim.spec.team],
                    usage[target.spec.team],
                )
                self.result.preemptions.append(record)
                self.pending_serve[plan.for_job].append(record)
                victim.preemptions += 1
                victim.phase = Phase.CHECKPOINTING
                victim.stop_at = now + self.config.checkpoint_seconds
                victim.since = now  # the service's waited counts from preempted_at
                self._push(victim.stop_at, "stop", victim)
            self.earmarks[plan.for_job] = plan.host  # beneficiary.earmarked_worker


def simulate(config: SimConfig, workload: list[JobSpec] | None = None) -> SimResult:
    """Run the pool from time 0 to `config.days`; jobs still running then are cut there."""
    began = time.perf_counter()
    if workload is None:
        workload = make_workload(config.days, config.seed)
    pool = Pool(config, workload)
    horizon = config.days * DAY
    now = 0.0
    while now < horizon:
        pool.advance(now)
        pool.schedule(now)
        now += config.pass_seconds
    pool.advance(horizon)
    pool.result.seconds = time.perf_counter() - began
    return pool.result


# Report ------------------------------------------------------------------------------------


VARIANTS = (None, DEFAULT_POLICY)
"""The preemption policy of each variant the report compares: none, and the service's
(plan_preemptions with fair-share usage, the freed host earmarked for its job)."""
KINDS = (("light", "light teams"), ("bursty", "bursty teams"), ("steady", "steady team"))
KINDS += (("heavy", "heavy teams"),)
REVERSAL_WINDOWS = (("M", None), ("6 h", 6 * HOUR))
"""Windows a swap back is counted in (None: the policy's M)."""


def variant_name(config: SimConfig) -> str:
    return "no preemption" if config.preemption is None else "preemption"


def gpu_seconds_by_team(result: SimResult, start: float = 0.0, end: float | None = None) -> dict:
    """GPU-seconds each team held (training, restarting or checkpointing) in [start, end)."""
    end = result.config.days * DAY if end is None else end
    held: dict[int, float] = defaultdict(float)
    for run in result.runs:
        lo, hi = max(start, run.start), min(end, run.end if run.end is not None else end)
        if hi > lo:
            held[run.team] += (hi - lo) * len(run.gpus)
    return held


def reversals(result: SimResult, window: float) -> list[tuple[PreemptionRecord, PreemptionRecord]]:
    """(earlier, later) pairs where team A's job was preempted for team B's and then, within
    `window`, a job of team B was preempted for one of team A's: GPUs traded back."""
    found, by_pair = [], defaultdict(list)  # (victim team, for team) -> times
    for record in result.preemptions:
        for earlier in by_pair[record.for_team, record.victim_team]:
            if record.at - earlier.at <= window:
                found.append((earlier, record))
                break
        by_pair[record.victim_team, record.for_team].insert(0, record)
    return found


def capped_fair_shares(demand: dict[int, float], weights: dict[int, float]) -> dict[int, float]:
    """Weighted max-min shares of the GPU-hours handed out (water-filling): a team that
    wants less than its weight's part gets what it wants, the rest is split by weight among
    the others. `demand` is in units of the total handed out (so it sums to >= 1 when the
    pool was short)."""
    shares, left, budget = {}, set(demand), 1.0
    while left:
        level = budget / sum(weights[t] for t in left)
        capped = {t for t in left if demand[t] <= level * weights[t]}
        if not capped:
            shares.update({t: level * weights[t] for t in left})
            break
        for t in capped:
            shares[t] = demand[t]
            budget -= demand[t]
        left -= capped
    return shares


def p95(values: list[float]) -> float | None:
    """Nearest-rank 95th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summarize(result: SimResult) -> dict:
    config = result.config
    horizon = config.days * DAY
    capacity = sum(gpus for _, _, gpus in HOSTS) * horizon
    held = gpu_seconds_by_team(result)
    teams_with_work = sorted({job.spec.team for job in result.jobs})
    total_weight = sum(TEAMS[t].weight for t in teams_with_work)
    total_held = sum(held.values()) or 1.0
    demand = {
        t: sum(j.spec.work * j.spec.gpus for j in result.jobs if j.spec.team == t)
        for t in teams_with_work
    }
    capped = capped_fair_shares(
        {t: demand[t] / total_held for t in teams_with_work},
        {t: TEAMS[t].weight for t in teams_with_work},
    )
    teams = [
        {
            "team": TEAMS[t].name,
            "kind": TEAMS[t].kind,
            "weight": TEAMS[t].weight,
            "weight_share": TEAMS[t].weight / total_weight,
            "demand_gpu_hours": demand[t] / HOUR,
            "capped_fair_share": capped[t],
            "gpu_hours": held[t] / HOUR,
            "share": held[t] / total_held,
        }
        for t in teams_with_work
    ]
    waits: dict[str, list[float]] = defaultdict(list)
    never = defaultdict(int)
    for job in result.jobs:
        started = job.first_start if job.first_start is not None else horizon
        wait = started - job.spec.submit
        groups = [str(job.spec.gpus), dict(KINDS)[TEAMS[job.spec.team].kind]]
        if TEAMS[job.spec.team].kind == "light" and A100 in job.spec.eligible:
            groups.append("light teams, 40 GB jobs")
        if A100 not in job.spec.eligible:
            groups.append("80 GB-only jobs")
        for group in groups:
            waits[group].append(wait)
            never[group] += job.first_start is None
    overhead = sum(
        min(run.overhead, (run.end or horizon) - run.start) * len(run.gpus) for run in result.runs
    ) + sum(
        min(config.checkpoint_seconds, (run.end or horizon) - run.start) * len(run.gpus)
        for run in result.runs
        if run.stopped
    )
    served = [p for p in result.preemptions if p.served_at is not None]
    promptly = [
        p for p in served if p.served_at - p.at <= config.checkpoint_seconds + config.pass_seconds
    ]
    per_job = defaultdict(int)
    for p in result.preemptions:
        per_job[p.victim] += 1
    h100_gpus = sum(gpus for _, cls, gpus in HOSTS if cls == H100)
    a100_gpus = sum(gpus for _, cls, gpus in HOSTS if cls == A100)
    on_h100 = sum(1 for p in result.preemptions if p.host.startswith("h100"))
    k = config.preemption.max_preemptions if config.preemption else None
    past_k = [run for run in result.runs if k is not None and run.preempted_before >= k]
    past_k_hours = [((run.end or horizon) - run.start) / HOUR for run in past_k]
    order = sorted(waits, key=_group_order)
    return {
        "variant": variant_name(config),
        "policy": asdict(config.preemption) if config.preemption else None,
        "days": config.days,
        "seed": config.seed,
        "teams": teams,
        "p95_wait_hours": {group: p95(waits[group]) / HOUR for group in order},
        "median_wait_hours": {group: statistics.median(waits[group]) / HOUR for group in order},
        "jobs_by_group": {group: len(waits[group]) for group in order},
        "never_started": {group: never[group] for group in order if never[group]},
        "utilisation": total_held / capacity,
        "preemption_overhead_gpu_hours": overhead / HOUR,
        "preemptions": len(result.preemptions),
        "preemptions_per_day": len(result.preemptions) / config.days,
        "preemptions_per_gpu_day_40gb": (len(result.preemptions) - on_h100)
        / (a100_gpus * config.days),
        "preemptions_per_gpu_day_80gb": on_h100 / (h100_gpus * config.days),
        "jobs_preempted": len(per_job),
        "preemptions_on_80gb_host": on_h100,
        "preempted_as_soon_as_allowed": sum(
            1 for p in result.preemptions if p.ran < config.preemption.min_run_seconds + 5 * MINUTE
        )
        if config.preemption
        else 0,
        "most_preemptions_of_one_job": max(per_job.values(), default=0),
        "preemptions_serving_their_job": len(served),
        "preemptions_serving_their_job_promptly": len(promptly),
        "reversals": {
            name: len(reversals(result, window or config.preemption.min_run_seconds))
            if config.preemption
            else 0
            for name, window in REVERSAL_WINDOWS
        },
        "runs_past_k": len(past_k),
        "runs_past_k_gpu_hours": sum(
            h * len(run.gpus) for h, run in zip(past_k_hours, past_k, strict=True)
        ),
        "longest_run_past_k_hours": max(past_k_hours, default=0.0),
        "jobs_submitted": len(result.jobs),
        "jobs_finished": sum(1 for job in result.jobs if job.phase == Phase.DONE),
        "passes": result.passes,
        "placement_calls": result.placement_calls,
        "placement_seconds": result.placement_seconds,
        "preemption_calls": result.preemption_calls,
        "preemption_seconds": result.preemption_seconds,
        "sim_seconds": result.seconds,
    }


def _group_order(group: str) -> tuple:
    if group.isdigit():
        return (0, int(group), "")
    kinds = [name for _, name in KINDS]
    return (1, kinds.index(group), "") if group in kinds else (2, 0, group)


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(summaries: list[dict]) -> str:
    """Markdown tables: shares per team, then one column of pool figures per variant."""
    names = [s["variant"] for s in summaries]
    lines = [
        "| team | kind | weight | weight share | demand GPU-h | demand-capped fair share | "
        + " | ".join(f"share ({n})" for n in names)
        + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for i, team in enumerate(summaries[0]["teams"]):
        cells = [
            team["team"],
            team["kind"],
            f"{team['weight']:g}",
            f"{team['weight_share']:.1%}",
            f"{team['demand_gpu_hours']:.0f}",
            f"{team['capped_fair_share']:.1%}",
        ]
        cells += [f"{s['teams'][i]['share']:.1%}" for s in summaries]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for group in summaries[0]["p95_wait_hours"]:
        label = f"{group}-GPU jobs" if group.isdigit() else group
        count = summaries[0]["jobs_by_group"][group]
        lines.append(
            f"| wait p95 (median), {label} (h), n={count} | "
            + " | ".join(
                f"{_hours(s['p95_wait_hours'][group])} ({_hours(s['median_wait_hours'][group])})"
                + (
                    f", {s['never_started'][group]} never started"
                    if s["never_started"].get(group)
                    else ""
                )
                for s in summaries
            )
            + " |"
        )
    rows = [
        ("utilisation (GPU-h held / capacity)", lambda s: f"{s['utilisation']:.1%}"),
        (
            "GPU-h lost to checkpoints and restarts",
            lambda s: f"{s['preemption_overhead_gpu_hours']:.1f}",
        ),
        ("preemptions per day", lambda s: f"{s['preemptions_per_day']:.1f}"),
        (
            "preemptions per GPU per day, 40 GB / 80 GB hosts",
            lambda s: (
                f"{s['preemptions_per_gpu_day_40gb']:.2f} / {s['preemptions_per_gpu_day_80gb']:.2f}"
            ),
        ),
        (
            "victims stopped within 5 min of reaching M",
            lambda s: str(s["preempted_as_soon_as_allowed"]),
        ),
        (
            "jobs preempted (most times one job)",
            lambda s: f"{s['jobs_preempted']} ({s['most_preemptions_of_one_job']})",
        ),
        (
            "preemptions whose job then started on that host (within checkpoint + a pass)",
            lambda s: (
                f"{s['preemptions_serving_their_job']} of {s['preemptions']} "
                f"({s['preemptions_serving_their_job_promptly']})"
            ),
        ),
        (
            "preemptions handing GPUs back to the team that took them, within M / 6 h",
            lambda s: " / ".join(str(n) for n in s["reversals"].values()),
        ),
        (
            "runs after a job's K-th preemption: count, GPU-h, longest (h)",
            lambda s: (
                f"{s['runs_past_k']}, {s['runs_past_k_gpu_hours']:.0f}, "
                f"{s['longest_run_past_k_hours']:.1f}"
            ),
        ),
        (
            "jobs finished (of submitted)",
            lambda s: f"{s['jobs_finished']} of {s['jobs_submitted']}",
        ),
        (
            "wall time: simulation, in plan_preemptions (s)",
            lambda s: f"{s['sim_seconds']:.1f}, {s['preemption_seconds']:.1f}",
        ),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in summaries) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pass-seconds", type=float, default=30.0)
    parser.add_argument("--json", help="also write both variants' figures to this file")
    args = parser.parse_args(argv)
    summaries = [
        summarize(
            simulate(
                SimConfig(
                    days=args.days, seed=args.seed, pass_seconds=args.pass_seconds, preemption=p
                )
            )
        )
        for p in VARIANTS
    ]
    print(table(summaries))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summaries, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
