"""bench/pool_sim.py over a simulated day (and a 10-hour flood), checking what the real
plan_placement and plan_preemptions did: gangs on one host, no GPU given twice, K and M
kept, light teams waiting less with preemption, and GPU shares moving toward weights.
The full week is `python -m bench.pool_sim` (docs/scheduling.md, Pool simulation)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from bench.pool_sim import (
    DEFAULT_POLICY,
    VARIANTS,
    SimConfig,
    gpu_seconds_by_team,
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
    for policy, earmark in VARIANTS:
        config = SimConfig(days=1, seed=1, preemption=policy, earmark=earmark)
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
    for name in ("preemption", "preemption + earmark"):
        result = day[name]
        assert result.preemptions, f"{name}: the day should need some preemptions"
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


def test_preemption_shortens_the_light_teams_p95_wait(day) -> None:
    without = summarize(day["no preemption"])["p95_wait_hours"]["light teams"]
    for name in ("preemption", "preemption + earmark"):
        with_preemption = summarize(day[name])["p95_wait_hours"]["light teams"]
        assert with_preemption < without / 2, (name, with_preemption, without)


def test_earmarked_preemptions_go_to_the_job_they_were_made_for(day) -> None:
    plain = summarize(day["preemption"])
    earmarked = summarize(day["preemption + earmark"])
    assert earmarked["preemptions_serving_their_job"] == earmarked["preemptions"]
    assert plain["preemptions_serving_their_job"] < plain["preemptions"]


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


@pytest.mark.parametrize("policy", [None, DEFAULT_POLICY], ids=["without", "with"])
def test_gpu_shares_move_toward_weights(policy) -> None:
    result = simulate(SimConfig(days=10 / 24, preemption=policy), _flood())
    first_hour = _distance_from_weights(result, 0, HOUR)
    so_far = _distance_from_weights(result, 0, 10 * HOUR)
    assert first_hour > 0.8  # the first team held most of the pool
    assert so_far < first_hour / 4
    if policy is not None:
        # Preemption corrects within the hour; later 2-hour windows stay near the weights.
        assert so_far < 0.1
        for start in (4, 6, 8):
            assert _distance_from_weights(result, start * HOUR, (start + 2) * HOUR) < 0.15


def test_the_report_has_a_column_per_variant_and_a_row_per_team(day) -> None:
    summaries = [summarize(result) for result in day.values()]
    text = table(summaries)
    assert text.count("\n| light-") == 4
    for name in day:
        assert f"share ({name})" in text
    assert "p95 wait, 8-GPU jobs" in text and "preemptions per day" in text


def test_a_seed_gives_the_same_workload_every_time() -> None:
    assert make_workload(1, seed=5) == make_workload(1, seed=5)
    assert make_workload(1, seed=5) != make_workload(1, seed=6)
