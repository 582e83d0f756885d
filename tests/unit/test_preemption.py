"""Preemption by fair share (app.domain.preemption)."""

from __future__ import annotations

from app.domain.preemption import PreemptionPolicy, Running, Waiting, plan_preemptions

A, B, C = 1, 2, 3
CLS = frozenset({"a100"})
POLICY = PreemptionPolicy(wait_seconds=600, max_preemptions=2, min_run_seconds=1800)


def run(key, team, host="h1", gpus=1, priority="normal", ran=3600, started=0.0, **kw):
    return Running(
        key,
        team,
        host,
        "a100",
        gpus,
        priority,
        ran,
        started,
        kw.get("preemptions", 0),
        kw.get("preemptible", True),
        kw.get("stopping", False),
    )


def wait(key, team, gpus=1, waited=900):
    return Waiting(key, team, gpus, CLS, waited)


def plan(waiting, running, hosts=None, weights=None, policy=POLICY):
    hosts = hosts or {"h1": ("a100", 2, 0)}
    return plan_preemptions(waiting, running, hosts, weights or {}, policy)


def test_a_team_filling_the_pool_gives_one_gpu_to_a_waiting_team() -> None:
    plans = plan([wait(9, B)], [run(1, A, started=10), run(2, A, started=20)])
    assert len(plans) == 1
    assert plans[0].for_job == 9 and plans[0].victims == (2,)  # the newest


def test_nothing_before_the_wait_or_when_free() -> None:
    assert plan([wait(9, B, waited=100)], [run(1, A), run(2, A)]) == []
    assert plan([wait(9, B)], [run(1, A)], hosts={"h1": ("a100", 2, 1)}) == []


def test_lowest_priority_first_and_high_last() -> None:
    running = [run(1, A, priority="high", started=30), run(2, A, priority="low", started=10)]
    assert plan([wait(9, B)], running)[0].victims == (2,)


def test_limits_k_and_m_and_marks() -> None:
    assert plan([wait(9, B)], [run(1, A, preemptions=2), run(2, A, preemptions=2)]) == []
    assert plan([wait(9, B)], [run(1, A, ran=60), run(2, A, ran=60)]) == []
    marked = [run(1, A, preemptible=False), run(2, A, preemptible=False)]
    assert plan([wait(9, B)], marked) == []
    mixed = [run(1, A, preemptible=False), run(2, A, ran=60), run(3, A, host="h1")]
    assert plan([wait(9, B)], mixed, hosts={"h1": ("a100", 3, 0)})[0].victims == (3,)


def test_a_team_at_its_share_is_not_preempted() -> None:
    # A and B hold one GPU each of two: both at their share; B's second job waits.
    running = [run(1, A), run(2, B)]
    assert plan([wait(9, B)], running) == []


def test_three_teams_on_two_gpus_take_turns() -> None:
    # Entitlements of 2/3 GPU: a team holding one is over, one holding none is under, so
    # the GPUs rotate (no faster than min_run_seconds, at most max_preemptions a job).
    assert plan([wait(9, C)], [run(1, A, started=5), run(2, B, started=1)])[0].victims == (1,)


def test_a_team_already_at_its_share_does_not_preempt() -> None:
    running = [run(1, A), run(2, A), run(3, A), run(4, B)]
    hosts = {"h1": ("a100", 4, 0)}
    # B holds 1 of its 2: it may take one of A's; with 2 it may not.
    assert len(plan([wait(9, B)], running, hosts)) == 1
    running[2] = run(3, B)
    assert plan([wait(9, B)], running, hosts) == []


def test_a_gang_job_gets_all_its_gpus_on_one_host() -> None:
    running = [run(1, A, host="h1"), run(2, A, host="h2"), run(3, A, host="h2")]
    hosts = {"h1": ("a100", 1, 0), "h2": ("a100", 2, 0)}
    plans = plan([wait(9, B, gpus=2)], running, hosts, weights={B: 3.0})
    assert plans[0].host == "h2" and set(plans[0].victims) == {2, 3}


def test_no_second_preemption_while_one_is_stopping() -> None:
    running = [run(1, A), run(2, A, stopping=True)]
    assert plan([wait(9, B)], running) == []


def test_weights_decide_the_share() -> None:
    # Two GPUs, A weight 3, B weight 1: A's entitlement is 1.5, so B's wait takes one.
    running = [run(1, A), run(2, A)]
    assert len(plan([wait(9, B)], running, weights={A: 3.0})) == 1
    # A of weight 1 against B of weight 0.2: B is entitled to a third of a GPU, holds
    # none, and the swap would leave A (1 per weight) above B's 0: allowed once.
    assert len(plan([wait(9, B)], running, weights={B: 0.2})) == 1


def test_one_gpu_pool_time_shares() -> None:
    hosts = {"h1": ("a100", 1, 0)}
    assert len(plan([wait(9, B)], [run(1, A)], hosts)) == 1


def test_several_waiting_jobs_longest_first_without_reusing_victims() -> None:
    running = [run(1, A, started=1), run(2, A, started=2), run(3, A, started=3)]
    hosts = {"h1": ("a100", 3, 0)}
    plans = plan([wait(8, B, waited=700), wait(9, C, waited=800)], running, hosts)
    assert [p.for_job for p in plans] == [9, 8]
    assert len({v for p in plans for v in p.victims}) == 2


def test_only_a_team_ahead_in_fair_share_usage_loses_gpus() -> None:
    running = [run(1, A), run(2, A)]
    assert plan_preemptions(
        [wait(9, B)], running, {"h1": ("a100", 2, 0)}, {}, POLICY, usage={A: 5000.0, B: 50.0}
    )
    assert not plan_preemptions(
        [wait(9, B)], running, {"h1": ("a100", 2, 0)}, {}, POLICY, usage={A: 50.0, B: 5000.0}
    )


def test_two_teams_do_not_trade_gpus_back_once_usage_is_counted() -> None:
    # B preempted A's 2-GPU job and now holds the host; A waits. A is below its share and
    # B above, but B has used less: A does not preempt back until B is ahead in usage by
    # more than A's job would use in its protected M (2 GPUs x 1800 s per weight 1).
    hosts = {"h1": ("a100", 2, 0)}
    running = [run(5, B, gpus=2, started=100)]
    for b_usage, preempts in ((600.0, False), (900.0, False), (4400.0, False), (4401.0, True)):
        plans = plan_preemptions(
            [wait(1, A, gpus=2)], running, hosts, {}, POLICY, usage={A: 800.0, B: b_usage}
        )
        assert bool(plans) == preempts, b_usage


def test_the_usage_margin_is_per_weight() -> None:
    # Weight 2 halves the margin: 1 GPU x 1800 s / 2 = 900.
    running = [run(1, A), run(2, A)]
    hosts = {"h1": ("a100", 2, 0)}
    weights = {B: 2.0}
    assert not plan_preemptions(
        [wait(9, B)], running, hosts, weights, POLICY, usage={A: 900.0, B: 0.0}
    )
    assert plan_preemptions([wait(9, B)], running, hosts, weights, POLICY, usage={A: 901.0, B: 0.0})


def test_gpus_freed_for_an_earmarked_job_are_not_spare_for_another() -> None:
    # Job 8 (team C) is earmarked h1, where A's job 1 is stopping for it. Job 9 of team B,
    # waiting longer, must not count job 1's GPU as its own: it gets A's other job.
    running = [run(1, A, stopping=True), run(2, A, started=5)]
    hosts = {"h1": ("a100", 2, 0)}
    waiting = [wait(9, B, waited=2000), wait(8, C, waited=900)]
    plans = plan_preemptions(waiting, running, hosts, {}, POLICY, earmarks={8: ("h1", 1)})
    assert [(p.for_job, p.victims) for p in plans] == [(9, (2,))]
    # Unaware of the earmark, both would count on job 1's one GPU, and nothing is freed
    # for B's job.
    assert plan_preemptions(waiting, running, hosts, {}, POLICY) == []


def test_nothing_movable_means_no_look_at_the_queue() -> None:
    protected = [run(1, A, preemptible=False), run(2, A, preemptible=False)]
    many = [wait(k, B) for k in range(10, 5000)]
    assert plan_preemptions(many, protected, {"h1": ("a100", 2, 0)}, {}, POLICY) == []
