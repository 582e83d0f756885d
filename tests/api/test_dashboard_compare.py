"""The dashboard's compare page (app/web/compare.py) in-process on Postgres: the job list's
checkboxes, the overlaid loss chart (two series per job, a colour each), the options that
differ and those that do not, the final figures, DPO's reward accuracy, the refusals (fewer
than two jobs, too many, another team's job); and the chart module's comparison charts.

The end-to-end comparison of two trained jobs in Chromium is
tests/e2e/test_dashboard_compare.py."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select, update

from app.models import Job
from app.services.events import add_event
from app.web.chart import (
    HEIGHT,
    Run,
    compare_loss_chart,
    compare_reward_accuracy_chart,
    loss_chart,
)
from tests.api.test_dashboard import browser_for, create_job, dpo_row, signed_in


def add_metrics(sessions, job_id: str, rows: list[dict]) -> None:
    with sessions() as session:
        pk = session.scalar(select(Job.pk).where(Job.id == job_id))
        for row in rows:
            add_event(session, pk, f"Step {row['step']}", type="metrics", data=row)
        session.commit()


def loss_rows(steps: int, scale: float) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "total_steps": steps, "train_loss": scale / step}
        if step % 5 == 0:
            row["valid_loss"] = scale * 1.2 / step
        rows.append(row)
    return rows


def section(html: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"(.*?)</(?:table|details|svg)>', html, re.S)
    assert found, f"no #{element_id} on the page"
    return found.group(1)


def option_names(table_html: str) -> list[str]:
    return re.findall(r'<tr data-option="([^"]+)">', table_html)


def test_the_job_list_is_a_get_form_to_compare(api, team) -> None:
    first, second = create_job(team), create_job(team)
    with signed_in(api, team.key) as browser:
        html = browser.get("/jobs").text
    form = re.search(
        r'<form method="get" action="/compare" id="compare-form">(.*?)</form>', html, re.S
    )
    assert form, html
    boxes = re.findall(r'<input type="checkbox" name="job" value="([^"]+)"', form.group(1))
    assert first["id"] in boxes and second["id"] in boxes
    assert 'id="compare-jobs"' in form.group(1)  # the submit button, inside the form
    assert f'<tr data-job="{first["id"]}">' in html  # the rows keep their hook


def test_two_jobs_compared_overlay_their_losses_and_list_what_differs(api, team, sessions) -> None:
    slow = create_job(
        team, hyperparameters={"learning_rate_multiplier": 0.5}, seed=7, suffix="slow"
    )
    fast = create_job(team, hyperparameters={"learning_rate_multiplier": 2.0}, seed=8)
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == slow["id"])
            .values(
                status="succeeded",
                started_at=1_000,
                finished_at=1_125,
                gpu_seconds=120.0,
                trained_tokens=4096,
                fine_tuned_model="ft:tiny-random-llama:slow:abc",
            )
        )
        session.commit()
    add_metrics(sessions, slow["id"], loss_rows(20, 3.0))
    add_metrics(sessions, fast["id"], loss_rows(10, 2.0))

    with signed_in(api, team.key) as browser:
        resp = browser.get("/compare", params={"job": [slow["id"], fast["id"]]})
    assert resp.status_code == 200, resp.text
    html = resp.text
    assert resp.headers["content-security-policy"].startswith("default-src 'none'")
    assert "script-src" not in resp.headers["content-security-policy"]

    # The chart: a train and a validation line for each job, in the job's colour.
    svg = section(html, "compare-chart")
    lines = re.findall(
        r'<polyline class="series (\w+) (job-\d)" data-series="(\w+)" data-job="([^"]+)" '
        r'points="([^"]*)"',
        svg,
    )
    assert sorted((job, name, css) for _, css, name, job, _ in lines) == sorted(
        [
            (slow["id"], "train", "job-0"),
            (slow["id"], "valid", "job-0"),
            (fast["id"], "train", "job-1"),
            (fast["id"], "valid", "job-1"),
        ]
    )
    counts = {(job, name): len(points.split()) for _, _, name, job, points in lines}
    assert counts[(slow["id"], "train")] == 20 and counts[(slow["id"], "valid")] == 4
    assert counts[(fast["id"], "train")] == 10 and counts[(fast["id"], "valid")] == 2
    # One scale: the shorter run ends left of the longer one.
    right = {
        (job, name): float(points.split()[-1].split(",")[0]) for _, _, name, job, points in lines
    }
    assert right[(fast["id"], "train")] < right[(slow["id"], "train")]
    legend = re.findall(r'<g class="legend legend-job" data-job="([^"]+)"', svg)
    assert legend == [slow["id"], fast["id"]]
    assert f"{slow['id']} · slow" in svg  # the legend names the job and its suffix
    assert "train loss (solid)" in svg and "validation loss (dashed)" in svg
    assert svg.count('class="dot valid job-0"') == 4 and svg.count('class="dot valid job-1"') == 2
    assert 'id="compare-reward-accuracy-chart"' not in html  # no DPO job

    # The options: what differs in its table, what is the same only in the collapsed one.
    differing = option_names(section(html, "differing-options"))
    assert {"hyperparameters.learning_rate_multiplier", "seed", "suffix"} <= set(differing)
    assert "model" not in differing and "max_seq_length" not in differing
    same = option_names(section(html, "same-options"))
    assert {"model", "max_seq_length", "method", "lora.r"} <= set(same)
    assert not set(same) & set(differing)
    row = re.search(
        r'<tr data-option="hyperparameters.learning_rate_multiplier">(.*?)</tr>', html, re.S
    )
    assert row and re.findall(r"<td>([^<]*)</td>", row.group(1)) == ["0.5", "2.0"]
    assert re.search(r'<details id="same-options">', html)  # collapsed: no "open"

    # The final figures, one column per job in the order asked.
    figures = section(html, "figures")
    train = re.search(r'data-figure="train_loss">(.*?)</tr>', figures, re.S)
    assert train
    cells = [
        " ".join(re.sub(r"<[^>]+>", " ", c).split())
        for c in re.findall(r"<td[^>]*>(.*?)</td>", train.group(1), re.S)
    ]
    assert cells == ["0.15 step 20", "0.2 step 10"]
    valid = re.search(r'data-figure="valid_loss">(.*?)</tr>', figures, re.S)
    assert valid and "0.18" in valid.group(1) and "0.24" in valid.group(1)
    for figure, expected in (
        ("duration", "2m 05s"),
        ("gpu_seconds", "2m 00s"),
        ("trained_tokens", "4,096"),
        ("fine_tuned_model", "ft:tiny-random-llama:slow:abc"),
    ):
        row = re.search(rf'data-figure="{figure}">(.*?)</tr>', figures, re.S)
        assert row and expected in row.group(1), figure
    assert 'class="status succeeded"' in figures and 'class="status queued"' in figures
    assert 'http-equiv="refresh"' in html  # a compared job is still queued


def test_a_dpo_job_among_them_adds_the_reward_accuracy_chart(api, team, sessions) -> None:
    dpo, supervised = create_job(team), create_job(team)
    with sessions() as session:
        session.execute(update(Job).where(Job.id == dpo["id"]).values(method="dpo"))
        session.commit()
    add_metrics(sessions, dpo["id"], [dpo_row(s, s % 5 == 0) for s in range(1, 11)])
    add_metrics(sessions, supervised["id"], loss_rows(10, 2.0))
    with signed_in(api, team.key) as browser:
        html = browser.get(f"/compare?job={supervised['id']}&job={dpo['id']}").text
    svg = section(html, "compare-reward-accuracy-chart")
    series = re.findall(r'data-series="(\w+)" data-job="([^"]+)"', svg)
    assert sorted(series) == [
        ("train_reward_accuracy", dpo["id"]),
        ("valid_reward_accuracy", dpo["id"]),
    ]
    assert 'class="series train job-1"' in svg  # the DPO job's colour on every chart
    assert re.findall(r'<g class="legend legend-job" data-job="([^"]+)"', svg) == [dpo["id"]]
    row = re.search(r'data-figure="valid_reward_accuracy">(.*?)</tr>', html, re.S)
    assert row and "0.700" in row.group(1) and "—" in row.group(1)
    assert "method" in option_names(section(html, "differing-options"))


@pytest.mark.parametrize("position", [0, 1])
def test_another_teams_job_is_a_404_naming_it_and_showing_none_of_it(
    api, team, other_team, sessions, position
) -> None:
    mine = create_job(team)
    theirs = create_job(other_team, suffix="secret-suffix")
    add_metrics(sessions, theirs["id"], loss_rows(5, 9.0))
    ids = [mine["id"], theirs["id"]] if position else [theirs["id"], mine["id"]]
    with signed_in(api, team.key) as browser:
        resp = browser.get("/compare", params={"job": ids})
        unknown = browser.get("/compare", params={"job": [mine["id"], "ftjob-nosuch"]})
        odd = browser.get("/compare", params={"job": [mine["id"], "<b>x</b>"]})
    assert resp.status_code == 404
    assert f"No fine-tuning job {theirs['id']} in team" in resp.text
    assert "secret-suffix" not in resp.text and "<svg" not in resp.text
    assert resp.headers["x-frame-options"] == "DENY"
    assert unknown.status_code == 404 and "No fine-tuning job ftjob-nosuch in team" in unknown.text
    assert (
        odd.status_code == 404 and "<b>x</b>" not in odd.text and "&lt;b&gt;x&lt;/b&gt;" in odd.text
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "Select at least 2 jobs to compare (0 selected)."),
        ("?job=ONE", "Select at least 2 jobs to compare (1 selected)."),
        ("?job=ONE&job=ONE&job=", "Select at least 2 jobs to compare (1 selected)."),
        ("?" + "&".join(f"job=ftjob-{i}" for i in range(9)), "At most 8 jobs can be compared"),
    ],
)
def test_fewer_than_two_jobs_or_more_than_eight_is_a_clear_message(
    api, team, query, message
) -> None:
    job = create_job(team)
    with signed_in(api, team.key) as browser:
        resp = browser.get("/compare" + query.replace("ONE", job["id"]))
    assert resp.status_code == 400
    assert message in resp.text and 'id="compare-message"' in resp.text
    assert 'href="/jobs"' in resp.text


def test_compare_needs_sign_in_and_escapes_what_jobs_hold(api, team, sessions) -> None:
    evil = "<script>x</script>"
    first, second = create_job(team, suffix="a"), create_job(team, suffix="b")
    with sessions() as session:
        session.execute(update(Job).where(Job.id == first["id"]).values(suffix=evil))
        session.commit()
    add_metrics(sessions, first["id"], loss_rows(5, 1.0))
    query = f"/compare?job={first['id']}&job={second['id']}"
    resp = browser_for(api).get(query)
    assert resp.status_code == 303
    assert resp.headers["location"].startswith("/login?next=/compare")
    with signed_in(api, team.key) as browser:
        html = browser.get(query).text
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html


# --- the chart module --------------------------------------------------------------------


def test_compare_chart_scales_all_runs_together_with_a_colour_each() -> None:
    runs = [
        Run("ftjob-a", "ftjob-a · first", loss_rows(20, 3.0)),
        Run("ftjob-b", "ftjob-b", [{"step": 1, "learning_rate": 0.1}]),  # no loss yet
        Run("ftjob-c", "ftjob-c", [{"step": s, "train_loss": 5.0} for s in range(1, 41)]),
    ]
    chart = compare_loss_chart(runs)
    assert chart is not None
    assert [(s.job, s.name, s.css) for s in chart.series] == [
        ("ftjob-a", "train", "train job-0"),
        ("ftjob-a", "valid", "valid job-0"),
        ("ftjob-c", "train", "train job-2"),  # the colour keeps the job's place
    ]
    a_train, a_valid, c_train = chart.series
    assert a_valid.dots and not a_train.dots
    assert a_train.label == "ftjob-a train loss"
    # One x scale (steps 1..40) and one y scale (losses 0.15..5).
    assert a_train.points[-1][0] < c_train.points[-1][0] == chart.right_edge
    assert c_train.points[0][1] < a_train.points[-1][1]  # 5.0 sits above 0.15
    style_keys = [k for k in chart.keys if not k.job]
    job_keys = [k for k in chart.keys if k.job]
    assert [(k.label, k.styles) for k in style_keys] == [
        ("train loss (solid)", ("train",)),
        ("validation loss (dashed)", ("valid",)),
    ]
    assert [(k.job, k.css, k.styles) for k in job_keys] == [
        ("ftjob-a", "job-0", ("train", "valid")),
        ("ftjob-c", "job-2", ("train",)),
    ]
    # The job legend sits under the plot, in a chart taller than the job page's.
    assert all(k.y > chart.bottom_edge + 40 for k in job_keys)
    assert chart.height > HEIGHT and chart.bottom_edge == loss_chart(runs[0].rows).bottom_edge


def test_compare_charts_of_nothing_are_none_and_nine_runs_are_refused() -> None:
    runs = [Run("ftjob-a", "a", []), Run("ftjob-b", "b", [{"step": 1, "train_loss": 1.0}])]
    assert compare_reward_accuracy_chart(runs) is None
    assert compare_loss_chart(runs[:1]) is None
    reward = compare_reward_accuracy_chart([Run("ftjob-d", "d", [dpo_row(1), dpo_row(2, True)])])
    assert reward is not None and [label for _, label in reward.y_ticks][-1] == "1.0"
    with pytest.raises(ValueError, match="at most 8"):
        compare_loss_chart([Run(f"ftjob-{i}", str(i), []) for i in range(9)])


def test_the_job_pages_loss_chart_is_unchanged_by_comparisons() -> None:
    """The job page's chart: no job keys, no job on its series, the page's height."""
    chart = loss_chart(loss_rows(10, 2.0))
    assert chart is not None
    assert chart.keys == [] and chart.height == HEIGHT
    assert [(s.name, s.css, s.job) for s in chart.series] == [
        ("train", "train", ""),
        ("valid", "valid", ""),
    ]


def test_the_job_page_still_draws_its_legend_and_no_job_attributes(api, team, sessions) -> None:
    job = create_job(team)
    add_metrics(sessions, job["id"], loss_rows(10, 2.0))
    with signed_in(api, team.key) as browser:
        html = browser.get(f"/jobs/{job['id']}").text
    svg = section(html, "loss-chart")
    assert "data-job" not in svg and "legend-job" not in svg
    assert '<g class="legend" transform="translate(640, 12)">' in svg
    assert ">train loss<" in svg and ">validation loss<" in svg
    assert 'y="334" text-anchor="middle">step<' in svg  # where it always was
