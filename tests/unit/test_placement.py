"""Gang placement with reservations and backfill (app.domain.placement)."""

from __future__ import annotations

import math

import pytest

from app.domain.placement import Host, plan_placement
from app.domain.scheduling import QueuedJob, TeamShare

A, B, C = 1, 2, 3
ANY = frozenset({"a100"})


def job(key, team, gpus=1, created=0.0, seconds=None, priority="normal", eligible=ANY):
    return QueuedJob(key, team, priority, created, eligible, gpus=gpus, expected_seconds=seconds)


def place(jobs, hosts, shares=None, typical=3600.0, order=()):
    return plan_placement(jobs, shares or {}, hosts, typical_job_seconds=typical, class_order=order)


def test_a_gang_job_starts_only_with_all_its_gpus_on_one_host() -> None:
    # Two hosts with one free GPU each: three free... but never two on one host.
    hosts = [Host("h1", "a100", [0, 500]), Host("h2", "a100", [0, 900])]
    plan = place([job(1, A, gpus=2)], hosts)
    assert plan.started == []
    assert "reserved on h1" in plan.waiting[1]
    assert plan.reservations[0].host == "h1" and plan.reservations[0].starts_in == 500


def test_a_gang_job_takes_a_whole_free_host() -> None:
    hosts = [Host("h1", "a100", [0, 0, 0, 100]), Host("h2", "a100", [0, 0])]
    plan = place([job(1, A, gpus=2)], hosts)
    # Best fit: the host left with the fewest free GPUs, so h1's three stay together.
    assert [(j.key, h) for j, h in plan.started] == [(1, "h2")]


def test_backfill_only_of_jobs_that_end_before_the_reservation() -> None:
    hosts = [Host("h1", "a100", [0, 600])]  # one GPU free now, the other in 10 min
    big = job(1, A, gpus=2, created=0)
    long_small = job(2, B, created=1, seconds=3600)
    short_small = job(3, C, created=2, seconds=300)
    plan = place([big, long_small, short_small], hosts)
    assert [j.key for j, _ in plan.started] == [3]  # the short one ends first
    assert plan.reservations[0].starts_in == 600
    assert 2 not in [j.key for j, _ in plan.started]


def test_backfill_may_take_gpus_the_reservation_does_not_need() -> None:
    hosts = [Host("h1", "a100", [0, 0, 600])]  # a 2-GPU job reserved: 2 free at 600 s
    plan = place([job(1, A, gpus=3), job(2, B, created=1, seconds=10_000)], hosts)
    # 3 GPUs are ready at 600 s; a long 1-GPU job would push that out: refused.
    assert plan.started == []
    # A 2-GPU job reserved on [free, 600, 600]: the GPUs at 600 s are enough for it, so
    # the free one may go to a long job.
    hosts = [Host("h1", "a100", [0, 600, 600])]
    plan = place([job(1, A, gpus=2), job(2, B, created=1, seconds=10_000)], hosts)
    assert [j.key for j, _ in plan.started] == [2]
    assert plan.reservations[0].starts_in == 600


def test_fair_share_orders_the_reservation_before_backfill() -> None:
    # B has used more: A's big job is first in line and holds the host.
    shares = {A: TeamShare(A, 1.0, 0.0), B: TeamShare(B, 1.0, 10_000.0)}
    hosts = [Host("h1", "a100", [0, 1200])]
    plan = place([job(1, A, gpus=2, created=9), job(2, B, created=0)], hosts, shares)
    assert plan.started == [] and plan.reservations[0].job == 1


def test_a_team_is_charged_per_gpu() -> None:
    # A starts a 4-GPU job, B a 1-GPU job: A's next job waits behind B's next one.
    hosts = [Host("h1", "a100", [0] * 4), Host("h2", "a100", [0])]
    jobs = [job(1, A, gpus=4), job(2, A, created=1), job(3, B, created=2)]
    plan = place(jobs, hosts)
    assert [j.key for j, _ in plan.started] == [1, 3]


def test_no_host_of_the_size() -> None:
    plan = place([job(1, A, gpus=8)], [Host("h1", "a100", [0, 0])])
    assert "no live host" in plan.waiting[1] and plan.reservations == []


def test_draining_hosts_never_free() -> None:
    plan = place([job(1, A, gpus=2)], [Host("h1", "a100", [math.inf, math.inf])])
    assert "draining" in plan.waiting[1]


def test_one_reservation_per_host() -> None:
    hosts = [Host("h1", "a100", [100, 200])]
    plan = place([job(1, A, gpus=2), job(2, B, gpus=2, created=1)], hosts)
    assert [r.job for r in plan.reservations] == [1]
    assert "reserved for a job ahead" in plan.waiting[2]


def test_classes_in_the_given_order_and_eligibility() -> None:
    hosts = [Host("big", "h100", [0, 0]), Host("small", "a100", [0, 0])]
    both = frozenset({"a100", "h100"})
    plan = place([job(1, A, gpus=2, eligible=both)], hosts, order=("a100", "h100"))
    assert plan.started[0][1] == "small"
    plan = place([job(1, A, eligible=frozenset({"h100"}))], hosts, order=("a100", "h100"))
    assert plan.started[0][1] == "big"


def test_quota_stops_a_team() -> None:
    shares = {A: TeamShare(A, 1.0, 0.0, running=[5.0], max_running=1)}
    plan = place([job(1, A)], [Host("h1", "a100", [0])], shares)
    assert plan.started == []


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="0 GPUs"):
        place([job(1, A, gpus=0)], [])


def test_running_gpus_weigh_the_charge() -> None:
    # A runs one 4-GPU job, B one 1-GPU job of the same age: B goes first.
    shares = {
        A: TeamShare(A, 1.0, 0.0, running=[1000.0], running_gpus=[4]),
        B: TeamShare(B, 1.0, 0.0, running=[1000.0]),
    }
    plan = place([job(1, A), job(2, B, created=5)], [Host("h1", "a100", [0])], shares)
    assert [j.key for j, _ in plan.started] == [2]


def test_an_earmarked_job_takes_the_gpus_its_preemption_freed() -> None:
    # B is behind A in fair share, but the GPU was freed for A's job by a preemption.
    shares = {A: TeamShare(A, 1.0, 10_000.0), B: TeamShare(B, 1.0, 0.0)}
    hosts = [Host("h1", "a100", [0, 900])]
    jobs = [job(1, A, created=5), job(2, B, created=0)]
    plan = plan_placement(jobs, shares, hosts, typical_job_seconds=600, earmarks={1: "h1"})
    assert [(j.key, h) for j, h in plan.started] == [(1, "h1")]


def test_an_earmarked_job_holds_its_host_until_the_victim_stops() -> None:
    shares = {A: TeamShare(A, 1.0, 10_000.0), B: TeamShare(B, 1.0, 0.0)}
    hosts = [Host("h1", "a100", [0, 60])]  # GPU 1: the victim, stopping
    jobs = [job(1, A, gpus=2, created=5), job(2, B, created=0, seconds=3600)]
    plan = plan_placement(jobs, shares, hosts, typical_job_seconds=600, earmarks={1: "h1"})
    assert plan.started == []  # B's hour-long job may not take GPU 0 meanwhile
    assert plan.reservations[0].job == 1 and "preemption" in plan.waiting[1]


def test_an_earmark_on_a_draining_host_is_ignored() -> None:
    shares = {A: TeamShare(A, 1.0, 10_000.0), B: TeamShare(B, 1.0, 0.0)}
    hosts = [Host("h1", "a100", [math.inf, math.inf]), Host("h2", "a100", [0, 0])]
    jobs = [job(1, A, gpus=2, created=5)]
    plan = plan_placement(jobs, shares, hosts, typical_job_seconds=600, earmarks={1: "h1"})
    assert [(j.key, h) for j, h in plan.started] == [(1, "h2")]
