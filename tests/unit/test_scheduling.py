"""Fair-share scheduling: team order, priorities, quotas, classes and start estimates."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from app.domain.scheduling import (
    QueuedJob,
    TeamShare,
    decayed_usage,
    estimate_starts,
    pick_next,
    plan_dispatch,
    queue_order,
)

A, B, C = 1, 2, 3


def job(
    key: int,
    team: int,
    created_at: float,
    priority: str = "normal",
    eligible: frozenset[str] = frozenset({"a100"}),
) -> QueuedJob:
    return QueuedJob(key, team, priority, created_at, eligible)


def test_a_team_with_less_usage_goes_first_even_if_it_submitted_later() -> None:
    candidates = [job(key, A, created_at=float(key)) for key in range(1, 6)]
    candidates.append(job(6, B, created_at=100.0))
    shares = {A: TeamShare(A, 1.0, recent_gpu_seconds=3600.0), B: TeamShare(B, 1.0, 0.0)}
    assert pick_next(candidates, shares, "a100") == candidates[-1]


def test_equal_usage_is_broken_by_the_oldest_job_then_the_team_key() -> None:
    assert pick_next([job(1, A, 50.0), job(2, B, 10.0)], {}, "a100") == job(2, B, 10.0)
    assert pick_next([job(1, B, 10.0), job(2, A, 10.0)], {}, "a100") == job(2, A, 10.0)


def test_one_pass_over_two_slots_takes_one_job_from_each_team() -> None:
    candidates = [job(1, A, 1.0), job(2, A, 2.0), job(3, A, 3.0), job(4, B, 50.0)]
    plan = plan_dispatch(candidates, {}, {"a100": 2})
    assert sorted(j.team for j, _ in plan) == [A, B]
    assert all(gpu_class == "a100" for _, gpu_class in plan)


def test_running_jobs_count_at_least_the_dispatch_charge() -> None:
    # A's job started a second ago: it counts as 300 s, more than B's 200 s of history.
    shares = {A: TeamShare(A, 1.0, 0.0, running=[1.0]), B: TeamShare(B, 1.0, 200.0)}
    assert pick_next([job(1, A, 1.0), job(2, B, 2.0)], shares, "a100").team == B
    # With no dispatch charge A counts as 1 s and goes first.
    assert pick_next([job(1, A, 1.0), job(2, B, 2.0)], shares, "a100", 0.0).team == A


def test_plan_dispatch_does_not_modify_the_callers_shares() -> None:
    shares = {A: TeamShare(A, 1.0, 0.0, running=[10.0]), B: TeamShare(B, 1.0, 0.0)}
    plan_dispatch([job(1, A, 1.0), job(2, B, 2.0), job(3, A, 3.0)], shares, {"a100": 3})
    assert shares[A].running == [10.0]
    assert shares[B].running == []


def test_a_team_with_twice_the_weight_gets_twice_the_turns() -> None:
    candidates = [job(key, A, float(key)) for key in range(100)]
    candidates += [job(1000 + key, B, float(key)) for key in range(100)]
    shares = {A: TeamShare(A, 2.0, 0.0), B: TeamShare(B, 1.0, 0.0)}
    first = Counter(j.team for j in queue_order(candidates, shares)[:30])
    assert 19 <= first[A] <= 21
    assert first[A] + first[B] == 30


def test_priority_orders_a_teams_own_jobs() -> None:
    older_normal = job(1, A, 1.0, "normal")
    newer_high = job(2, A, 2.0, "high")
    oldest_low = job(3, A, 0.0, "low")
    order = queue_order([older_normal, newer_high, oldest_low], {})
    assert order == [newer_high, older_normal, oldest_low]


def test_priority_does_not_jump_ahead_of_a_team_that_used_less() -> None:
    shares = {A: TeamShare(A, 1.0, 0.0), B: TeamShare(B, 1.0, 5000.0)}
    a_normal = job(1, A, 10.0, "normal")
    b_high = job(2, B, 1.0, "high")
    assert pick_next([b_high, a_normal], shares, "a100") == a_normal


def test_a_team_at_its_running_limit_is_skipped() -> None:
    shares = {A: TeamShare(A, 1.0, 0.0, running=[], max_running=1), B: TeamShare(B, 1.0, 9e9)}
    candidates = [job(1, A, 1.0), job(2, A, 2.0), job(3, B, 3.0)]
    plan = plan_dispatch(candidates, shares, {"a100": 3})
    assert [j.key for j, _ in plan] == [1, 3]
    full = {A: TeamShare(A, 1.0, 0.0, running=[5.0], max_running=1)}
    assert pick_next([job(1, A, 1.0)], full, "a100") is None


def test_queue_order_ignores_the_running_limit() -> None:
    shares = {A: TeamShare(A, 1.0, 0.0, running=[5.0], max_running=1)}
    assert len(queue_order([job(1, A, 1.0), job(2, A, 2.0)], shares)) == 2


def test_a_job_runs_only_on_an_eligible_class() -> None:
    big = job(1, A, 1.0, eligible=frozenset({"h100"}))
    small = job(2, B, 2.0, eligible=frozenset({"a10", "h100"}))
    assert pick_next([big, small], {}, "a10") == small
    assert pick_next([big], {}, "a10") is None
    plan = plan_dispatch([big, small], {}, {"a10": 1, "h100": 1})
    assert plan == [(small, "a10"), (big, "h100")]


def test_classes_are_filled_in_name_order_and_a_job_is_dispatched_once() -> None:
    both = frozenset({"a10", "h100"})
    candidates = [job(1, A, 1.0, eligible=both), job(2, A, 2.0, eligible=both)]
    plan = plan_dispatch(candidates, {}, {"h100": 5, "a10": 1})
    assert [(j.key, c) for j, c in plan] == [(1, "a10"), (2, "h100")]


def test_an_unknown_priority_is_an_error() -> None:
    with pytest.raises(ValueError, match="urgent"):
        queue_order([job(1, A, 1.0, "urgent")], {})


def test_queue_order_returns_every_job_once_for_a_large_queue() -> None:
    rng = random.Random(7)
    candidates = [
        job(key, rng.randrange(100), rng.uniform(0, 1e6), rng.choice(["low", "normal", "high"]))
        for key in range(10_000)
    ]
    shares = {t: TeamShare(t, rng.choice([0.5, 1.0, 2.0]), rng.uniform(0, 1e5)) for t in range(50)}
    order = queue_order(candidates, shares)
    assert len(order) == 10_000
    assert sorted(j.key for j in order) == list(range(10_000))
    plan = plan_dispatch(candidates, shares, {"a100": 500})
    assert len({j.key for j, _ in plan}) == 500


def test_decayed_usage_halves_every_half_life() -> None:
    now, half_life = 10_000.0, 3600.0
    assert decayed_usage([(now - half_life, 100.0)], now, half_life) == pytest.approx(50.0)
    assert decayed_usage([(now - 2 * half_life, 100.0)], now, half_life) == pytest.approx(25.0)
    assert decayed_usage([(now + 500, 100.0), (now, 10.0)], now, half_life) == 110.0
    assert decayed_usage([], now, half_life) == 0.0


def test_estimate_starts_uses_the_earliest_free_slot() -> None:
    assert estimate_starts(3, [0.0, 100.0], 600.0) == [0.0, 100.0, 600.0]
    assert estimate_starts(2, [], 600.0) == [math.inf, math.inf]
    assert estimate_starts(0, [0.0], 600.0) == []
