"""bench/pool_sim.py over a simulated day (and a 10-hour flood), checking what the real
plan_placement and plan_preemptions did, driven as the scheduler service drives them:
gangs on one host, no GPU given twice, K and M kept, GPUs taken only from a team ahead in
fair-share usage, each preemption's freed host starting its job, light teams waiting less
with preemption, and GPU shares moving toward weights. The full week is
`python -m bench.pool_sim` (docs/scheduling.md, Pool simulation)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from bench.pool_sim import (
    DEFAULT_POLICY,
    VARIANTS,
    SimConfig,
    SimResult,
    gpu_seconds_by_team,
    reversals,
    simulate,
    summarize,
    table,
    variant_name,
)
from bench.pool_workload import A100, DAY, H100, HOSTS, HOUR, TEAMS, JobSpec, make_workload

GPUS_PER_HOST = {host: gpus for host, _, gpus in HOSTS}
CLASS_OF = {host: cls for host, cls, _ in HOSTS}


@pytest.fixture(scope="module")
def day() -> dict:
    """One simulated day of the synthetic workload, per variant name."""
    results = {}
    for policy in VARIANTS:
        config = SimConfig(days=1, seed=1, preemption=policy)
        results[variant_name(config)] = simulate(config)
    return results


def test_every_run_had_all_its_gpus_on_one_host_of_a_class_it_fits(day) -> None:
    for result in day.values():
        jobs = {job.spec.key: job.spec for job in result.jobs}
        assert len(result.runs) > 30
        for run in result.runs:
            spec = jobs[run.job]
            assert len(set(run.gpus)) == len(run.gpus) == spec.gpus
            assert all(0 <= gpu < GPUS_PER_HOST[run.host] for gpu in run.gpus)
            assert CLASS_OF[run.host] in spec.eligible


def test_no_gpu_is_held_by_two_jobs_at_once(day) -> None:
    for result in day.values():
        horizon = result.config.days * DAY
        spans = defaultdict(list)
        for run in result.runs:
            for gpu in run.gpus:
                spans[run.host, gpu].append((run.start, run.end or horizon, run.job))
        for gpu, runs in spans.items():
            runs.sort()
            for (_, end, job), (start, _, other) in zip(runs, runs[1:], strict=False):
                assert start >= end, f"{gpu}: job {other} started before job {job} ended"


def test_no_job_is_preempted_more_than_k_times_or_within_m_of_a_start(day) -> None:
    policy = DEFAULT_POLICY
    result = day["preemption"]
    assert result.preemptions, "the day should need some preemptions"
    starts = defaultdict(list)
    for run in result.runs:
        starts[run.job].append(run.start)
    count = defaultdict(int)
    for record in result.preemptions:
        count[record.victim] += 1
        assert record.earlier == count[record.victim] - 1
        assert count[record.victim] <= policy.max_preemptions
        assert record.ran >= policy.min_run_seconds
        last_start = max(t for t in starts[record.victim] if t <= record.at)
        assert record.at - last_start >= policy.min_run_seconds


def test_gpus_are_taken_only_from_a_team_ahead_in_fair_share_usage(day) -> None:
    records = day["preemption"].preemptions
    assert records
    for record in records:
        assert record.victim_team != record.for_team
        assert record.victim_usage > record.for_usage, record


def test_preemption_shortens_the_light_teams_p95_wait(day) -> None:
    without = summarize(day["no preemption"])["p95_wait_hours"]["light teams"]
    with_preemption = summarize(day["preemption"])["p95_wait_hours"]["light teams"]
    assert with_preemption < without / 2, (with_preemption, without)


def _preempted_day(seed: int) -> SimResult:
    return simulate(SimConfig(days=1, seed=seed, preemption=DEFAULT_POLICY))


# Seed 11's day checks the earmarks plan_preemptions is told about: at 9.88 h job 23 is
# earmarked h100-0, where its victim 18 is stopping; the 8-GPU job 1, waiting longer, must
# not count those GPUs as spare (before, it did, and job 23 preempted a second time).
@pytest.mark.parametrize("seed", [1, 11], ids=["seed 1", "seed 11"])
def test_every_preemption_starts_its_job_on_the_freed_host_once_the_victim_stops(seed) -> None:
    result = _preempted_day(seed)
    config = result.config
    horizon = config.days * DAY
    assert result.preemptions
    for record in result.preemptions:
        if record.at + config.checkpoint_seconds + config.pass_seconds >= horizon:
            continue  # its victim was still checkpointing when the day ended
        assert record.served_at is not None, record
        assert record.served_at - record.at <= config.checkpoint_seconds + config.pass_seconds


# Seed 5's day: the usage margin (the waiting job's GPUs x M per weight) holds most teams
# apart, but not when a whole 8-GPU host changes hands: at 11.2 h burst-f takes h100-0 from
# heavy-i, its usage climbs by 8 GPUs' time, and 21.5 min later it is 2,415 GPU-s per weight
# ahead of heavy-i, past job 46's margin of 2,400, so heavy-i takes 3 GPUs back (each job
# still keeps M). A team-level "no hand-back within M" would need the preemption history.
USAGE_OVERTAKES_MARGIN = pytest.mark.xfail(
    strict=True, reason="a team's usage can overtake the margin within M after a whole host"
)


@pytest.mark.parametrize(
    "seed", [1, pytest.param(5, marks=USAGE_OVERTAKES_MARGIN)], ids=["seed 1", "seed 5"]
)
def test_no_two_teams_trade_gpus_back_within_m(seed) -> None:
    result = _preempted_day(seed)
    assert result.preemptions
    min_run = DEFAULT_POLICY.min_run_seconds
    # A job that got GPUs from team B is never preempted for team B within M of that.
    took_from = defaultdict(list)
    for record in result.preemptions:
        for earlier in took_from[record.victim]:
            assert not (
                earlier.victim_team == record.for_team and record.at - earlier.at <= min_run
            ), (earlier, record)
        took_from[record.for_job].append(record)
    # Nor does any other job of team B take GPUs back from team A within M.
    assert reversals(result, min_run) == []


def _flood() -> list[JobSpec]:
    """A weight-1 team fills the pool; 5 minutes later a weight-2 and a weight-4 team
    arrive. Every team has more 2-GPU, 2-hour jobs than its share could run in 10 hours."""
    both = frozenset({A100, H100})
    jobs, key = [], 0
    for team, at, count in ((0, 0.0, 40), (4, 300.0, 40), (9, 300.0, 60)):
        for i in range(count):
            key += 1
            jobs.append(JobSpec(key, team, 2, "normal", at + i, 2 * HOUR, 2 * HOUR, both))
    return jobs


def _distance_from_weights(result, start: float, end: float) -> float:
    """L1 distance between the teams' shares of GPU time in [start, end) and their weights."""
    held = gpu_seconds_by_team(result, start, end)
    teams = {job.spec.team for job in result.jobs}
    total, weights = sum(held.values()), sum(TEAMS[t].weight for t in teams)
    return sum(abs(held[t] / total - TEAMS[t].weight / weights) for t in teams)


def test_gpu_shares_move_toward_weights_and_preemption_evens_them_out() -> None:
    runs = {
        p is not None: simulate(SimConfig(days=10 / 24, preemption=p), _flood()) for p in VARIANTS
    }
    worst_window = {}
    for preempting, result in runs.items():
        first_hour = _distance_from_weights(result, 0, HOUR)
        so_far = _distance_from_weights(result, 0, 10 * HOUR)
        assert first_hour > 0.8  # the first team held most of the pool
        assert so_far < first_hour / 4
        worst_window[preempting] = max(
            _distance_from_weights(result, start * HOUR, (start + 2) * HOUR)
            for start in (2, 4, 6, 8)
        )
    # Preemption brings the ten hours' shares near the weights (it orders by decayed usage,
    # so a 2-hour window may favour the teams that had less before), and without it a
    # window can go almost all to one team: a batch of freed GPUs goes to the team furthest
    # behind.
    assert _distance_from_weights(runs[True], 0, 10 * HOUR) < 0.05
    assert worst_window[True] < 0.5 < 1.0 < worst_window[False]


def test_the_report_has_a_column_per_variant_and_a_row_per_team(day) -> None:
    summaries = [summarize(result) for result in day.values()]
    text = table(summaries)
    assert text.count("\n| light-") == 4
    for name in day:
        assert f"share ({name})" in text
    assert "8-GPU jobs" in text and "preemptions per day" in text
    assert len(day) == 2 and "preemption + earmark" not in text


def test_a_seed_gives_the_same_workload_every_time() -> None:
    assert make_workload(1, seed=5) == make_workload(1, seed=5)
    assert make_workload(1, seed=5) != make_workload(1, seed=6)
