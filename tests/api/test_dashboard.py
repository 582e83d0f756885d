"""The web dashboard (app/web) in-process on Postgres, Redis and S3: sign-in and its cookie,
pages refused without it, team scoping, escaping, the loss chart, cancel with its CSRF
token, the adapter download, and nothing of it in the OpenAPI document.

The browser is a TestClient of its own per test (the shared `api` client must not carry a
dashboard cookie into other tests); the end-to-end run in Chromium is
tests/e2e/test_dashboard.py."""

from __future__ import annotations

import io
import math
import re
import tarfile
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.domain.classification import classification_report
from app.models import Checkpoint, File, Job, Team, Worker
from app.services.events import add_event
from app.services.teams import create_team
from app.services.training_metrics import metrics_rows, metrics_rows_up_to
from app.storage import file_key
from app.web.auth import COOKIE
from app.web.chart import (
    loss_chart,
    nice_ticks,
    reward_accuracy_chart,
    reward_margin_chart,
    score_chart,
)
from app.web.classification import classification_view
from app.web.lineage import lineage_view
from app.web.tracking import link_target, trackers_view
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT

MODEL = "tiny-random-llama"


def browser_for(api: TestClient, base_url: str = "http://testserver") -> TestClient:
    """A fresh cookie jar on the same app (no lifespan: the app's state is already set)."""
    return TestClient(api.app, base_url=base_url, follow_redirects=False)


def signed_in(api: TestClient, key: str) -> TestClient:
    browser = browser_for(api)
    resp = browser.post("/login", data={"key": key})
    assert resp.status_code == 303, resp.text
    return browser


@pytest.fixture
def browser(api, team) -> Iterator[TestClient]:
    with signed_in(api, team.key) as client:
        yield client


def create_job(team: TeamClient, **body) -> dict:
    train = team.upload(CHAT).json()["id"]
    resp = team.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": train, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


# --- sign-in and the cookie ------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/jobs", "/jobs/ftjob-x", "/pool", "/usage", "/jobs/ftjob-x/results/a.tar.gz"]
)
def test_pages_need_the_cookie(api, path) -> None:
    resp = browser_for(api).get(path)
    assert resp.status_code == 303
    assert resp.headers["location"].startswith("/login")


def test_a_signed_out_cancel_goes_to_sign_in_before_any_check(api, team) -> None:
    job = create_job(team)
    resp = browser_for(api).post(f"/jobs/{job['id']}/cancel", data={"csrf": "nope"})
    assert (resp.status_code, resp.headers["location"]) == (
        303,
        f"/login?next=/jobs/{job['id']}/cancel",
    )
    assert resp.headers["cache-control"] == "no-store"
    assert team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"


def test_a_page_sends_you_back_to_it_after_login(api, team) -> None:
    browser = browser_for(api)
    resp = browser.get("/jobs?after=")
    assert resp.headers["location"] == "/login?next=/jobs%3Fafter%3D"
    page = browser.get(resp.headers["location"])
    assert page.status_code == 200
    assert 'name="next" value="/jobs?after="' in page.text
    login = browser.post("/login", data={"key": team.key, "next": "/pool"})
    assert (login.status_code, login.headers["location"]) == (303, "/pool")


def test_login_with_a_good_key_sets_an_httponly_strict_cookie(api, team) -> None:
    browser = browser_for(api)
    resp = browser.post("/login", data={"key": f"  {team.key}\n"})
    assert (resp.status_code, resp.headers["location"]) == (303, "/jobs")
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    page = browser.get("/jobs")
    assert page.status_code == 200
    assert "Fine-tuning jobs" in page.text
    # Signed in, the login page and / go to the jobs.
    assert browser.get("/login").headers["location"] == "/jobs"
    assert browser.get("/").headers["location"] == "/jobs"


def test_a_sign_in_posted_from_another_site_is_refused(api, team) -> None:
    browser = browser_for(api)
    resp = browser.post("/login", data={"key": team.key}, headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.status_code == 403 and "set-cookie" not in resp.headers
    ok = browser.post("/login", data={"key": team.key}, headers={"Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 303


def test_the_cookie_is_secure_over_https(api, team) -> None:
    resp = browser_for(api, "https://testserver").post("/login", data={"key": team.key})
    assert resp.status_code == 303
    assert "Secure" in resp.headers["set-cookie"]


@pytest.mark.parametrize(
    "key, status, message",
    [
        ("lathe-not-a-key", 401, "Invalid or revoked API key."),
        ("", 400, "Paste your team"),
        ("x" * 5000, 401, "Invalid or revoked API key."),
    ],
)
def test_a_bad_key_shows_an_error_and_sets_no_cookie(api, key, status, message) -> None:
    browser = browser_for(api)
    resp = browser.post("/login", data={"key": key})
    assert resp.status_code == status
    assert message in resp.text
    assert "set-cookie" not in resp.headers
    assert browser.get("/jobs").status_code == 303


def test_an_admin_key_signs_in_to_the_admin_pages_only(api, sessions) -> None:
    from app.services.admin_keys import create_admin_key

    with sessions() as session:
        _, key = create_admin_key(session, f"ops-{uuid.uuid4().hex[:6]}")
    browser = browser_for(api)
    resp = browser.post("/login", data={"key": key})
    assert (resp.status_code, resp.headers["location"]) == (303, "/admin/teams")
    assert browser.get("/jobs").status_code == 303  # no team page: test_dashboard_admin.py


def test_a_cookie_with_a_bad_or_revoked_key_is_no_session(api, team, sessions) -> None:
    browser = browser_for(api)
    browser.cookies.set(COOKIE, "lathe-forged")
    assert browser.get("/jobs").status_code == 303
    browser = signed_in(api, team.key)
    assert browser.get("/jobs").status_code == 200
    with sessions() as session:  # an administrator disables the team
        session.execute(update(Team).where(Team.id == team.id).values(disabled=True))
        session.commit()
    assert browser.get("/jobs").status_code == 303
    resp = browser_for(api).post("/login", data={"key": team.key})
    assert resp.status_code == 403
    assert "disabled" in resp.text


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil"])
def test_next_never_leaves_the_site(api, team, target) -> None:
    resp = browser_for(api).post("/login", data={"key": team.key, "next": target})
    assert resp.headers["location"] == "/jobs"


def test_logout_needs_the_token_and_clears_the_cookie(browser) -> None:
    refused = browser.post("/logout", data={"csrf": "0" * 40})
    assert refused.headers["location"] == "/jobs?notice=bad_csrf"
    assert browser.get("/jobs").status_code == 200
    token = csrf_of(browser.get("/jobs").text)
    resp = browser.post("/logout", data={"csrf": token})
    assert resp.headers["location"] == "/login"
    assert f'{COOKIE}=""' in resp.headers["set-cookie"] or "Max-Age=0" in resp.headers["set-cookie"]
    assert browser.get("/jobs").status_code == 303


# --- pages -------------------------------------------------------------------------------


def test_the_jobs_list_and_a_queued_jobs_page(browser, team) -> None:
    job = create_job(team, suffix="dash")
    listing = browser.get("/jobs")
    assert listing.status_code == 200
    row = re.search(rf'<tr data-job="{job["id"]}">(.*?)</tr>', listing.text, re.S)
    assert row, listing.text
    assert 'class="status queued">queued<' in row.group(1)
    page = browser.get(f"/jobs/{job['id']}")
    assert page.status_code == 200
    assert "Place in line" in page.text
    assert 'id="cancel-job"' in page.text
    assert 'id="download-adapter"' not in page.text
    assert 'http-equiv="refresh"' in page.text  # a waiting job's page reloads itself
    assert "No loss logged yet." in page.text
    assert "Validating training file" in page.text  # the events
    # Security headers: no script may run, the page is never cached or framed.
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"


def test_another_teams_job_is_404(browser, team, other_team, api) -> None:
    job = create_job(other_team)
    assert browser.get(f"/jobs/{job['id']}").status_code == 404
    assert browser.get(f"/jobs/{job['id']}/results/adapter.tar.gz").status_code == 404
    token = csrf_of(browser.get("/jobs").text)
    resp = browser.post(f"/jobs/{job['id']}/cancel", data={"csrf": token})
    assert resp.status_code == 404
    assert other_team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
    assert job["id"] not in browser.get("/jobs").text
    assert browser.get("/jobs/no%00such").status_code == 404
    page = browser.get(f"/jobs/{job['id']}")  # the 404 page is the signed-in team's
    assert f"No fine-tuning job {job['id']} in team" in page.text and "Log out" in page.text
    assert page.headers["x-frame-options"] == "DENY"


def test_html_is_escaped(api, team, sessions) -> None:
    evil = "<script>alert(1)</script>"
    job = create_job(team, metadata={"note": evil})
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(
                suffix=evil,
                stats={"sample": {"prompt": evil, "expected": "x", "completion": evil}},
                error={"message": evil, "code": "x"},
            )
        )
        name = f'<img src=x onerror="alert(1)">-{uuid.uuid4().hex[:6]}'
        _, key = create_team(session, name)
        session.commit()
    page = signed_in(api, team.key).get(f"/jobs/{job['id']}")
    assert page.status_code == 200
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    other = signed_in(api, key).get("/jobs")
    assert "<img src=x" not in other.text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in other.text


def test_the_loss_chart_draws_train_and_validation(browser, team, sessions) -> None:
    job = create_job(team)
    with sessions() as session:
        pk = session.scalar(select(Job.pk).where(Job.id == job["id"]))
        for step in range(1, 21):
            data = {"step": step, "total_steps": 20, "train_loss": 3 / step, "epoch": step / 10}
            if step % 5 == 0:
                data |= {"valid_loss": 3.5 / step, "valid_mean_token_accuracy": 0.5}
            add_event(session, pk, f"Step {step}", type="metrics", data=data)
        session.commit()
    page = browser.get(f"/jobs/{job['id']}").text
    assert '<svg id="loss-chart"' in page
    series = dict(re.findall(r'data-series="(\w+)" points="([^"]*)"', page))
    assert set(series) == {"train", "valid"}
    train = [tuple(map(float, p.split(","))) for p in series["train"].split()]
    valid = [tuple(map(float, p.split(","))) for p in series["valid"].split()]
    assert (len(train), len(valid)) == (20, 4)
    assert train[0][0] < train[-1][0] and train[0][1] < train[-1][1]  # right and down
    assert page.count('class="dot valid"') == 4
    assert ">train loss<" in page and ">validation loss<" in page  # the legend
    assert ">step<" in page and ">loss<" in page  # axis labels
    assert "validation token accuracy 50.0%" in page


def test_a_classifiers_page_shows_its_report_and_confusion_matrix(api, team, sessions) -> None:
    """stats.classification (the worker's final evaluation) as tables: the headline
    figures, per-class precision/recall/F1/support, and the confusion matrix with true
    classes as rows, predictions as columns and the diagonal marked. Class names are the
    user's labels: escaped like any other text."""
    evil = "<b>x</b>"
    classes = [evil, "Sports", "World"]
    # True x: 2 right, 1 read as Sports; Sports: 3 right; World: 1 right, 2 read as x.
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    predictions = [0, 0, 1, 1, 1, 1, 2, 0, 0]
    report = classification_report(classes, labels, predictions) | {"step": 12}
    job = create_job(team)
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(data_format="classification", stats={"classification": report})
        )
        pk = session.scalar(select(Job.pk).where(Job.id == job["id"]))
        for step, accuracy, f1 in [(6, 0.5, 0.4), (12, 0.6667, 0.6429)]:
            data = {"step": step, "total_steps": 12, "train_loss": 1.0 / step}
            data |= {"valid_loss": 0.9, "valid_accuracy": accuracy, "valid_macro_f1": f1}
            add_event(session, pk, f"Step {step}", type="metrics", data=data)
        session.commit()
    page = signed_in(api, team.key).get(f"/jobs/{job['id']}")
    assert page.status_code == 200
    html = page.text
    assert 'Classification <span class="muted">(validation, step 12)</span>' in html
    assert evil not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html
    assert re.search(r'id="classification-accuracy">0\.667<', html)
    assert re.search(r'id="classification-macro-f1">0\.643<', html)
    per_class = re.search(r'<table class="list" id="per-class">(.*?)</table>', html, re.S)
    assert per_class
    rows = re.findall(
        r"<tr><td class=\"class-name\">(.*?)</td>(.*?)</tr>", per_class.group(1), re.S
    )
    figures = {name: re.findall(r'class="num">([^<]*)<', cells) for name, cells in rows}
    # x: precision 2/4, recall 2/3; Sports: precision 3/4, recall 1; World: 1/1, 1/3.
    assert figures == {
        "&lt;b&gt;x&lt;/b&gt;": ["0.500", "0.667", "0.571", "3"],
        "Sports": ["0.750", "1.000", "0.857", "3"],
        "World": ["1.000", "0.333", "0.500", "3"],
    }
    matrix = re.search(r'<table class="confusion" id="confusion-matrix">(.*?)</table>', html, re.S)
    assert matrix
    header = re.findall(r'<th scope="col" class="class-name">(.*?)</th>', matrix.group(1))
    assert header == ["&lt;b&gt;x&lt;/b&gt;", "Sports", "World"]
    assert re.findall(r'<th scope="row" class="class-name">(.*?)</th>', matrix.group(1)) == header
    cells = {
        (int(i), int(j)): (kind, int(count))
        for kind, i, j, count in re.findall(
            r'<td class="num (\w+)" data-cell="(\d+),(\d+)"[^>]*>(\d+)</td>', matrix.group(1)
        )
    }
    assert cells == {
        (0, 0): ("diag", 2), (0, 1): ("confused", 1), (0, 2): ("zero", 0),
        (1, 0): ("zero", 0), (1, 1): ("diag", 3), (1, 2): ("zero", 0),
        (2, 0): ("confused", 2), (2, 1): ("zero", 0), (2, 2): ("diag", 1),
    }  # fmt: skip
    assert 'title="true World, predicted &lt;b&gt;x&lt;/b&gt;">2<' in html
    # The latest evaluation's figures under the loss chart, and the score chart.
    assert "validation accuracy 66.7%" in html and "macro-F1 0.643" in html
    series = dict(re.findall(r'data-series="(\w+)" points="([^"]*)"', html))
    assert set(series) == {"train", "valid", "accuracy", "macro_f1"}
    assert len(series["accuracy"].split()) == len(series["macro_f1"].split()) == 2
    assert '<svg id="score-chart"' in html and html.count('class="dot accuracy"') == 2


def test_a_generative_jobs_page_has_no_classification_section(browser, team) -> None:
    job = create_job(team)
    page = browser.get(f"/jobs/{job['id']}").text
    assert 'id="classification"' not in page and 'id="score-chart"' not in page


def dpo_row(step: int, valid: bool = False) -> dict:
    """A DPO job's metrics row as the worker writes it: rewards from TRL's rewards/*."""
    row = {
        "step": step,
        "total_steps": 20,
        "train_loss": 0.6931 - 0.02 * step,
        "train_reward_accuracy": min(0.05 * step, 1.0),
        "train_reward_margin": 0.1 * step,
        "train_rewards_chosen": 0.05 * step,
        "train_rewards_rejected": -0.05 * step,
    }
    if valid:
        row |= {
            "valid_loss": 0.7 - 0.02 * step,
            "valid_reward_accuracy": 0.5 + 0.02 * step,
            "valid_reward_margin": 0.08 * step - 0.1,
            "valid_rewards_chosen": 0.04 * step,
            "valid_rewards_rejected": -0.04 * step,
        }
    return row


def test_a_dpo_jobs_page_charts_its_rewards_and_shows_the_method(api, team, sessions) -> None:
    """Reward accuracy (0 to 1) and reward margin, train and validation, each a chart in
    the rewards panel with its latest figures; the method with beta among the options; the
    checkpoints' reward accuracy and margin."""
    job = create_job(team)
    with sessions() as session:
        hyperparameters = {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0}
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(method="dpo", hyperparameters=hyperparameters | {"beta": 0.25})
        )
        pk = session.scalar(select(Job.pk).where(Job.id == job["id"]))
        for step in range(1, 21):
            add_event(
                session, pk, f"Step {step}", type="metrics", data=dpo_row(step, step % 5 == 0)
            )
        session.add(
            Checkpoint(
                id=f"ftckpt-{uuid.uuid4().hex[:24]}",
                job_pk=pk,
                step_number=10,
                metrics=dpo_row(10, valid=True),
                fine_tuned_model_checkpoint="ft:tiny-random-llama:dpo:ckpt-step-10",
                storage_key="k",
            )
        )
        session.commit()
    html = signed_in(api, team.key).get(f"/jobs/{job['id']}").text
    assert 'id="rewards"' in html
    assert '<svg id="reward-accuracy-chart"' in html and '<svg id="reward-margin-chart"' in html
    series = dict(re.findall(r'data-series="(\w+)" points="([^"]*)"', html))
    assert set(series) == {
        "train",
        "valid",
        "train_reward_accuracy",
        "valid_reward_accuracy",
        "train_reward_margin",
        "valid_reward_margin",
    }
    assert len(series["train_reward_accuracy"].split()) == 20
    assert len(series["valid_reward_margin"].split()) == 4
    # Styled as the loss chart's train and validation lines; validation points are dots.
    assert 'class="series train" data-series="train_reward_margin"' in html
    assert 'class="series valid" data-series="valid_reward_accuracy"' in html
    assert html.count('class="dot valid"') == 4 * 3  # loss, reward accuracy, reward margin
    figures = re.search(r'<p class="muted" id="reward-figures">(.*?)</p>', html, re.S)
    assert figures
    text = " ".join(figures.group(1).split())
    assert "train reward accuracy 1.000 at step 20" in text
    assert "validation reward accuracy 0.900 at step 20" in text
    assert "train reward margin 2.000 at step 20" in text
    assert "validation reward margin 1.500 at step 20" in text
    # The latest evaluation under the loss chart.
    assert "validation reward accuracy 90.0%" in html and "reward margin 1.500" in html
    assert re.search(r'id="method">DPO, beta 0\.25<', html)
    checkpoints = re.search(r'<table class="list" id="checkpoints">(.*?)</table>', html, re.S)
    assert checkpoints and "Validation reward margin" in checkpoints.group(1)
    cells = re.findall(r'<td class="num">([^<]*)</td>', checkpoints.group(1))
    assert cells[-3:] == ["0.500", "0.700", "0.700"]  # train and valid accuracy, margin


def test_a_supervised_jobs_page_has_no_rewards_panel(browser, team) -> None:
    job = create_job(team)
    page = browser.get(f"/jobs/{job['id']}").text
    assert 'id="rewards"' not in page and 'id="lineage"' not in page
    assert re.search(r'id="method">supervised<', page)


def test_a_job_trained_on_from_fine_tuned_models_links_its_lineage(api, team, other_team, sessions):
    """base -> ft:A -> ft:B -> this job: each fine-tuned model links to the page of the
    job that trained it, read from each ancestor's own parent; the base model is text."""
    first, second, third = create_job(team), create_job(team), create_job(team)
    ft_a, ft_b = "ft:tiny-random-llama:a:1", "ft:tiny-random-llama:b:2"
    with sessions() as session:
        for job_id, values in [
            (first["id"], {"fine_tuned_model": ft_a, "lineage": [MODEL]}),
            (
                second["id"],
                {
                    "fine_tuned_model": ft_b,
                    "lineage": [MODEL, ft_a],
                    "parent": {"fine_tuned_model": ft_a, "job": first["id"], "checkpoint": None},
                },
            ),
            (
                third["id"],
                {
                    "method": "dpo",
                    "lineage": [MODEL, ft_a, ft_b],
                    "parent": {"fine_tuned_model": ft_b, "job": second["id"], "checkpoint": None},
                },
            ),
        ]:
            session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()
    with signed_in(api, team.key) as browser:
        html = browser.get(f"/jobs/{third['id']}").text
        lineage = re.search(r'<p class="lineage" id="lineage">(.*?)</p>', html, re.S)
        assert lineage
        text = re.sub(r"<[^>]+>", "", " ".join(lineage.group(1).split()))
        assert text == f"Lineage: {MODEL} → {ft_a} → {ft_b} → this job"
        links = re.findall(r'<a href="([^"]+)" data-job="[^"]+"><code>([^<]+)</code>', html)
        assert links == [(f"/jobs/{first['id']}", ft_a), (f"/jobs/{second['id']}", ft_b)]
        assert re.search(rf'id="parent"><code>{re.escape(ft_b)}</code>', html)
        # The middle job shows base -> ft:A -> this job; the first none at all.
        middle = browser.get(f"/jobs/{second['id']}").text
        assert re.findall(r'data-job="([^"]+)"', middle) == [first["id"]]
        assert 'id="lineage"' not in browser.get(f"/jobs/{first['id']}").text
        # The list names what each job was created with, and a DPO job says so.
        listing = browser.get("/jobs").text
        row = re.search(rf'<tr data-job="{third["id"]}">(.*?)</tr>', listing, re.S)
        assert row
        assert f'<td class="model">{ft_b} <span class="tag">DPO</span></td>' in row.group(1)
        row = re.search(rf'<tr data-job="{first["id"]}">(.*?)</tr>', listing, re.S)
        assert row and f'<td class="model">{MODEL}</td>' in row.group(1)
    # An ancestor the team does not have is named, not linked.
    stranger = create_job(other_team)
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == second["id"])
            .values(parent={"fine_tuned_model": ft_a, "job": stranger["id"], "checkpoint": None})
        )
        session.commit()
    with signed_in(api, team.key) as browser:
        html = browser.get(f"/jobs/{third['id']}").text
    assert re.findall(r'data-job="([^"]+)"', html) == [second["id"]]
    assert f"<code>{ft_a}</code>" in html and stranger["id"] not in html


def test_a_jobs_trackers_link_to_their_runs_and_only_over_http(api, team, sessions) -> None:
    """The integrations the job was created with, each with the run URL the worker
    reported: an https URL is a link (rel noopener noreferrer); a javascript: URL is shown
    as text and never becomes an href."""
    job = create_job(team)
    run = "https://wandb.example/acme/support/runs/abc123?x=1&y=2"
    evil = "javascript:alert(document.cookie)"
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(
                integrations=[
                    {
                        "type": "wandb",
                        "wandb": {"project": "support", "entity": "acme", "name": "run-1"},
                    },
                    {"type": "mlflow", "mlflow": {"experiment": "<b>exp</b>"}},
                ],
                stats={
                    "tracking": {
                        "wandb": {"url": run, "run_id": "abc123"},
                        "mlflow": {"url": evil, "run_id": "r1", "experiment_id": "1"},
                    }
                },
            )
        )
        session.commit()
    html = signed_in(api, team.key).get(f"/jobs/{job['id']}").text
    wandb = re.search(r'<dd class="tracker" data-tracker="wandb">(.*?)</dd>', html, re.S)
    mlflow = re.search(r'<dd class="tracker" data-tracker="mlflow">(.*?)</dd>', html, re.S)
    assert wandb and mlflow
    assert "<code>acme/support</code>, run <code>run-1</code>" in wandb.group(1)
    escaped = run.replace("&", "&amp;")
    assert (
        f'<a href="{escaped}" rel="noopener noreferrer" target="_blank">{escaped}</a>'
        in wandb.group(1)
    )
    assert "<code>&lt;b&gt;exp&lt;/b&gt;</code>" in mlflow.group(1)
    assert "<a " not in mlflow.group(1) and f'<code class="url">{evil}</code>' in mlflow.group(1)
    assert 'href="javascript' not in html.lower()
    assert ">Weights &amp; Biases</dt>" in html and ">MLflow</dt>" in html


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        " https://x.example/",
        "data:text/html,<b>x</b>",
        "https://user:pw@x.example/",
        "https:///nohost",
        "//x.example/run",
        "https://x.example/a b",
        "https://x.example/\n",
        "https://[::1/",
        "http://x.example/" + "a" * 3000,
        None,
        42,
    ],
)
def test_only_a_plain_http_url_is_a_link(url) -> None:
    assert link_target(url) is None


def test_http_and_https_urls_are_links() -> None:
    for url in ("http://127.0.0.1:5000/#/experiments/1/runs/ab", "https://wandb.ai/a/b/runs/c"):
        assert link_target(url) == url


def test_trackers_view_without_a_run_yet_and_a_run_without_its_integration() -> None:
    waiting = trackers_view([{"type": "mlflow", "mlflow": {"experiment": "e"}}], {})
    assert [(t.kind, t.target, t.url, t.link) for t in waiting] == [("mlflow", "e", None, None)]
    orphan = trackers_view([], {"tracking": {"wandb": {"url": "https://w.example/r"}}})
    assert [(t.name, t.link) for t in orphan] == [("Weights & Biases", "https://w.example/r")]
    assert trackers_view(None, {"tracking": "nonsense"}) == []


def test_lineage_view_maps_ancestors_from_the_end_and_stops_at_an_unknown_job() -> None:
    """lineage[-1] is the parent's output, lineage[-2] the grandparent's: read backwards
    along the parents; where a job is not found, older models are shown without a link."""
    from types import SimpleNamespace as Job_

    a = Job_(id="ftjob-a", parent=None)
    b = Job_(id="ftjob-b", parent={"fine_tuned_model": "ft:a", "job": "ftjob-a"})
    c = Job_(
        id="ftjob-c",
        model="base",
        lineage=["base", "ft:a", "ft:b"],
        parent={"fine_tuned_model": "ft:b", "job": "ftjob-b"},
    )
    jobs = {j.id: j for j in (a, b)}
    view = lineage_view(c, jobs.get)
    assert [(x.model, x.job_id) for x in view] == [
        ("base", None),
        ("ft:a", "ftjob-a"),
        ("ft:b", "ftjob-b"),
    ]
    del jobs["ftjob-a"]
    assert [x.job_id for x in lineage_view(c, jobs.get)] == [None, None, "ftjob-b"]
    assert lineage_view(a, jobs.get) == []
    # A parent loop in bad data ends at the lineage's length.
    loop = Job_(id="ftjob-l", model="base", lineage=["base", "ft:l"], parent=None)
    loop.parent = {"fine_tuned_model": "ft:l", "job": "ftjob-l"}
    assert [x.job_id for x in lineage_view(loop, {"ftjob-l": loop}.get)] == [None, "ftjob-l"]


def test_classification_view_shows_what_holds_together() -> None:
    """The stats are the worker's JSON: a matrix of another size than the class list is
    left out, the per-class figures still shown; no report, no section."""
    assert classification_view({}) is None
    assert classification_view({"classification": "nonsense"}) is None
    report = classification_report(["a", "b"], [0, 1, 1], [0, 1, 0])
    view = classification_view({"classification": report})
    assert view is not None and view.step is None
    assert [[(c.count, c.kind) for c in cells] for _, cells in view.matrix] == [
        [(1, "diag"), (0, "zero")],
        [(1, "confused"), (1, "diag")],
    ]
    broken = classification_view(
        {"classification": {**report, "confusion_matrix": [[1, 0]], "accuracy": "high"}}
    )
    assert broken is not None
    assert broken.matrix == [] and broken.accuracy is None
    assert [r.name for r in broken.per_class] == ["a", "b"]


def test_metrics_rows_up_to_a_step_keep_each_steps_latest_row(team, sessions) -> None:
    """What a resumed attempt's metrics.csv starts with: the earlier attempts' rows up to
    its checkpoint, a step logged twice (an attempt ran past its checkpoint) once."""
    job = create_job(team)
    with sessions() as session:
        pk = session.scalar(select(Job.pk).where(Job.id == job["id"]))
        for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0), (2, 2.4), (3, 1.9), (4, 1.5)]:
            add_event(session, pk, "Step", type="metrics", data={"step": step, "train_loss": loss})
        add_event(session, pk, "not a metric")
        session.commit()
        assert len(metrics_rows(session, pk)) == 6
        rows = metrics_rows_up_to(session, pk, 3)
    assert [(r["step"], r["train_loss"]) for r in rows] == [(1, 3.0), (2, 2.4), (3, 1.9)]


def test_cancel_needs_the_csrf_token(browser, team) -> None:
    job = create_job(team)
    refused = browser.post(f"/jobs/{job['id']}/cancel", data={"csrf": "nope"})
    assert refused.headers["location"] == f"/jobs/{job['id']}?notice=bad_csrf"
    assert team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
    token = csrf_of(browser.get(f"/jobs/{job['id']}").text)
    done = browser.post(f"/jobs/{job['id']}/cancel", data={"csrf": token})
    assert done.headers["location"] == f"/jobs/{job['id']}?notice=cancelled"
    assert team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    page = browser.get(done.headers["location"]).text
    assert "The job was cancelled." in page and 'id="cancel-job"' not in page
    again = browser.post(f"/jobs/{job['id']}/cancel", data={"csrf": token})
    assert again.headers["location"].endswith("notice=not_cancellable")


def test_download_streams_the_adapter_from_object_storage(
    api, browser, team, other_team, sessions
) -> None:
    job = create_job(team)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        body = b'{"r": 8}'
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    data = archive.getvalue()
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    api.app.state.store.put(file_key(team.id, file_id), io.BytesIO(data))
    with sessions() as session:
        team_pk = session.scalar(select(Team.pk).where(Team.id == team.id))
        session.add(
            File(
                id=file_id,
                team_pk=team_pk,
                filename="adapter.tar.gz",
                purpose="fine-tune-results",
                bytes=len(data),
                sha256="0" * 64,
                storage_key=file_key(team.id, file_id),
            )
        )
        session.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(status="succeeded", result_files=[file_id], finished_at=int(time.time()))
        )
        session.commit()
    page = browser.get(f"/jobs/{job['id']}").text
    assert 'id="download-adapter"' in page and 'id="cancel-job"' not in page
    assert 'http-equiv="refresh"' not in page  # a finished job's page stays put
    resp = browser.get(f"/jobs/{job['id']}/results/adapter.tar.gz")
    assert resp.status_code == 200
    assert resp.content == data
    assert resp.headers["content-type"] == "application/gzip"
    assert resp.headers["content-disposition"].startswith('attachment; filename="adapter.tar.gz"')
    assert browser.get(f"/jobs/{job['id']}/results/metrics.csv").status_code == 404
    with signed_in(api, other_team.key) as other:
        assert other.get(f"/jobs/{job['id']}/results/adapter.tar.gz").status_code == 404


def test_pool_and_usage_pages(browser, team, sessions) -> None:
    worker_id = f"w-{uuid.uuid4().hex[:8]}@dash"
    with sessions() as session:  # stopped: listed, but never a live slot for other tests
        session.add(
            Worker(
                id=worker_id,
                host="dash-host",
                gpu_name="test",
                gpu_class=f"d{uuid.uuid4().hex[:6]}",
                memory_gb=24.0,
                status="stopped",
                jobs_done=3,
                last_seen=time.time(),
            )
        )
        session.commit()
    pool = browser.get("/pool")
    assert pool.status_code == 200
    assert f'data-worker="{worker_id}"' in pool.text
    assert "Queue by GPU class" in pool.text
    usage = browser.get("/usage")
    assert usage.status_code == 200 and 'id="gpu-hours"' in usage.text
    assert "2026-05" in browser.get("/usage?period=2026-05").text
    bad = browser.get("/usage?period=2026-13")
    assert bad.status_code == 200 and "not a month" in bad.text
    assert "YYYY-MM" in browser.get("/usage?period=%3Cscript%3E").text


def test_the_dashboard_is_not_in_the_openapi_document(api) -> None:
    paths = api.app.openapi()["paths"]
    assert all(p.startswith("/v1/") or p in ("/healthz", "/readyz") for p in paths), paths
    assert browser_for(api).get("/static/dashboard.css").status_code == 200


# --- the chart's arithmetic --------------------------------------------------------------


def test_chart_keeps_a_repeated_steps_latest_row_and_skips_non_finite_losses() -> None:
    chart = loss_chart(
        [
            {"step": 1, "train_loss": 2.0},
            {"step": 2, "train_loss": 9.0},
            {"step": 2, "train_loss": 1.5, "valid_loss": 1.7},  # a resumed run logs it again
            {"step": 3, "train_loss": math.nan},
            {"step": 4, "train_loss": 1.0, "valid_loss": math.inf},
            {"step": True, "train_loss": 5.0},
            "not a row",  # type: ignore[list-item]
        ]
    )
    assert chart is not None
    train, valid = chart.series
    assert train.values == [(1, 2.0), (2, 1.5), (4, 1.0)]
    assert valid.values == [(2, 1.7)]
    assert all(chart.left <= x <= chart.right_edge for x, _ in train.points)
    assert all(chart.top <= y <= chart.bottom_edge for _, y in train.points)


def test_chart_of_nothing_is_none_and_of_one_point_is_drawn() -> None:
    assert loss_chart([]) is None
    assert loss_chart([{"step": 1, "learning_rate": 0.1}]) is None
    one = loss_chart([{"step": 7, "train_loss": 0.0}])
    assert one is not None and len(one.series[0].points) == 1
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 20, 6)[0] in (0, 5) and nice_ticks(1, 20, 6)[-1] == 20


def test_reward_charts_fixed_accuracy_scale_and_a_margin_scale_that_holds_zero() -> None:
    assert reward_accuracy_chart([{"step": 1, "train_loss": 1.0}]) is None
    assert reward_margin_chart([{"step": 1, "valid_accuracy": 0.5}]) is None
    rows = [dpo_row(1), dpo_row(2, valid=True), dpo_row(3)]
    accuracy = reward_accuracy_chart(rows)
    assert accuracy is not None
    assert [label for _, label in accuracy.y_ticks] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    train, valid = accuracy.series
    assert (train.name, train.css, train.dots) == ("train_reward_accuracy", "train", False)
    assert (valid.name, valid.css, valid.dots) == ("valid_reward_accuracy", "valid", True)
    assert [v for _, v in train.values] == pytest.approx([0.05, 0.1, 0.15])
    # Margins all above zero: the scale still reaches down to zero, with zero a tick.
    margin = reward_margin_chart(rows)
    assert margin is not None
    assert "0.0" in [label for _, label in margin.y_ticks]
    zero_y = next(y for y, label in margin.y_ticks if label == "0.0")
    assert all(y < zero_y for _, y in margin.series[0].points)  # above the zero line
    # All zero (the first step: policy and reference are the same model): still drawn.
    flat = reward_margin_chart([{"step": 1, "train_reward_margin": 0.0}])
    assert flat is not None and len(flat.series[0].points) == 1


def test_score_chart_draws_accuracy_and_macro_f1_on_a_fixed_scale() -> None:
    assert score_chart([{"step": 1, "train_loss": 1.0, "valid_mean_token_accuracy": 0.5}]) is None
    chart = score_chart(
        [
            {"step": 5, "valid_accuracy": 0.9, "valid_macro_f1": 0.85},
            {"step": 10, "valid_accuracy": 0.95, "valid_macro_f1": math.nan},
        ]
    )
    assert chart is not None
    accuracy, macro_f1 = chart.series
    assert (accuracy.name, accuracy.values) == ("accuracy", [(5, 0.9), (10, 0.95)])
    assert (macro_f1.name, macro_f1.values) == ("macro_f1", [(5, 0.85)])
    assert [label for _, label in chart.y_ticks] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert [(x, y) for x, y, _, _ in accuracy.marks] == accuracy.points


def test_a_checkpoints_adapter_downloads_from_the_job_page(
    api, browser, team, other_team, sessions
) -> None:
    """Each checkpoint with an adapter file links it; the link serves the team's bytes only,
    and a checkpoint without one (written before adapter files) says none."""
    job = create_job(team)
    data = b"step-400 adapter bytes"
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    api.app.state.store.put(file_key(team.id, file_id), io.BytesIO(data))
    kept, older = f"ftckpt-{uuid.uuid4().hex[:24]}", f"ftckpt-{uuid.uuid4().hex[:24]}"
    with sessions() as session:
        team_pk = session.scalar(select(Team.pk).where(Team.id == team.id))
        job_pk = session.scalar(select(Job.pk).where(Job.id == job["id"]))
        session.add(
            File(
                id=file_id,
                team_pk=team_pk,
                filename="checkpoint-step-400-adapter.tar.gz",
                purpose="fine-tune-results",
                bytes=len(data),
                sha256="0" * 64,
                storage_key=file_key(team.id, file_id),
            )
        )
        session.flush()
        for ckpt_id, step, adapter in ((kept, 400, file_id), (older, 200, None)):
            session.add(
                Checkpoint(
                    id=ckpt_id,
                    job_pk=job_pk,
                    step_number=step,
                    metrics={},
                    fine_tuned_model_checkpoint=f"ft:x:ckpt-step-{step}",
                    storage_key=f"teams/{team.id}/jobs/{job['id']}/checkpoints/step-{step}.tar.gz",
                    adapter_file=adapter,
                )
            )
        session.commit()

    page = browser.get(f"/jobs/{job['id']}").text
    link = f"/jobs/{job['id']}/checkpoints/{kept}/adapter.tar.gz"
    assert f'href="{link}"' in page
    assert f"/checkpoints/{older}/adapter.tar.gz" not in page
    resp = browser.get(link)
    assert resp.status_code == 200 and resp.content == data
    assert "checkpoint-step-400-adapter.tar.gz" in resp.headers["content-disposition"]
    assert browser.get(f"/jobs/{job['id']}/checkpoints/{older}/adapter.tar.gz").status_code == 404
    with signed_in(api, other_team.key) as other:
        assert other.get(link).status_code == 404
