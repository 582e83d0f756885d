"""Comparing runs in a real headless browser: Playwright drives Debian's Chromium against
the production-shaped stack of tests/e2e/conftest.py (as tests/e2e/test_dashboard.py does).

Two small QLoRA jobs on the same files, differing in learning_rate_multiplier, seed and
suffix, run to success on the stack's workers. The browser ticks both on the job list and
presses Compare: the chart has a train and a validation line per job and a legend entry
each, the table of differing options lists exactly what was changed, the final figures sit
side by side. Ticking one job gives the message instead. A full-page screenshot of the
comparison is saved under the test's tmp dir, and into $LATHE_SCREENSHOT_DIR when set
(README's docs/images/dashboard-compare.png is made that way)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import create_team_key
from tests.e2e.conftest import save_screenshot, submit, team_client, upload, wait_for
from tests.e2e.test_dashboard import FINAL, TIMEOUT_MS

pytestmark = pytest.mark.slow
SETTINGS = {"slow": (0.5, 11), "fast": (4.0, 12)}  # suffix: (learning_rate_multiplier, seed)


@pytest.fixture(scope="module")
def team_key(live_api: str, e2e_env: dict[str, str], workers) -> str:
    return create_team_key(e2e_env, "compare")[1]


@pytest.fixture(scope="module")
def api(live_api: str, team_key: str) -> Iterator[httpx.Client]:
    with team_client(live_api, team_key) as client:
        yield client


@pytest.fixture(scope="module")
def finished_jobs(api: httpx.Client) -> dict[str, str]:
    """{suffix: job id}: two jobs on the same files, trained side by side by the workers."""
    train, valid = upload(api, "sample_chat.jsonl"), upload(api, "sample_chat_valid.jsonl")
    jobs = {
        suffix: submit(
            api,
            train,
            validation_file=valid,
            hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": lr},
            seed=seed,
            suffix=suffix,
        )
        for suffix, (lr, seed) in SETTINGS.items()
    }

    def all_final():
        found = [api.get(f"/v1/fine_tuning/jobs/{job_id}").json() for job_id in jobs.values()]
        return found if all(j["status"] in FINAL for j in found) else None

    for job in wait_for(all_final, 420, what="both compared jobs to finish"):
        assert job["status"] == "succeeded", job["error"]
    # The worker meters a run's GPU time just after it publishes the result.
    wait_for(lambda: api.get("/v1/usage").json()["jobs"] == 2, 30, what="both jobs' GPU time")
    return jobs


def test_compare_two_finished_jobs_in_chromium(
    chromium,
    live_api: str,
    team_key: str,
    finished_jobs: dict[str, str],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    context = chromium.new_context(base_url=live_api, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    slow, fast = finished_jobs["slow"], finished_jobs["fast"]
    try:
        page.goto("/login")
        page.get_by_label("Team API key").fill(team_key)
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(f"{live_api}/jobs")

        # One job ticked: the page says two are needed.
        page.get_by_label(f"Select {slow} to compare").check()
        page.get_by_role("button", name="Compare selected").click()
        expect(page.locator("#compare-message")).to_contain_text("Select at least 2 jobs")
        page.go_back()
        expect(page).to_have_url(f"{live_api}/jobs")

        for job_id in (slow, fast):
            box = page.get_by_label(f"Select {job_id} to compare")
            box.check()
            expect(box).to_be_checked()
        page.get_by_role("button", name="Compare selected").click()
        expect(page).to_have_url(re.compile(r"/compare\?job=ftjob-[^&]+&job=ftjob-"))
        assert {slow, fast} == set(re.findall(r"job=([^&]+)", page.url))

        # The chart: a train and a validation line per job, each named in the legend.
        chart = page.locator("svg#compare-chart")
        expect(chart).to_be_visible()
        expect(chart.locator("polyline[data-job]")).to_have_count(4)
        for job_id in (slow, fast):
            lines = chart.locator(f'polyline[data-job="{job_id}"]')
            expect(lines).to_have_count(2)
            train = lines.and_(page.locator('[data-series="train"]'))
            valid = lines.and_(page.locator('[data-series="valid"]'))
            assert len((train.get_attribute("points") or "").split()) >= 10
            assert len((valid.get_attribute("points") or "").split()) >= 2
        legend = chart.locator("g.legend-job")
        expect(legend).to_have_count(2)
        expect(legend.nth(0)).to_contain_text(re.compile(r"ftjob-\S+ · (slow|fast)"))
        colours = {
            line.evaluate("e => getComputedStyle(e).stroke")
            for line in chart.locator('polyline[data-series="train"]').all()
        }
        assert len(colours) == 2, colours  # a colour per job
        dash = chart.locator('polyline[data-series="valid"]').first.evaluate(
            "e => getComputedStyle(e).strokeDasharray"
        )
        assert dash not in ("", "none"), dash  # validation dashed

        # The options that differ: what was changed, and nothing that was not.
        differing = page.locator("#differing-options tbody tr")
        names = sorted(differing.evaluate_all("rows => rows.map(r => r.dataset.option)"))
        assert names == ["hyperparameters.learning_rate_multiplier", "seed", "suffix"], names
        lr = page.locator(
            '#differing-options tr[data-option="hyperparameters.learning_rate_multiplier"]'
        )
        expect(lr).to_contain_text("0.5")
        expect(lr).to_contain_text("4.0")
        same = page.locator("#same-options")
        expect(same.locator('tr[data-option="model"]')).to_be_hidden()  # collapsed

        # Final figures side by side.
        figures = page.locator("#figures")
        expect(figures.locator(".status.succeeded")).to_have_count(2)
        for figure in (
            "train_loss",
            "valid_loss",
            "trained_tokens",
            "duration",
            "gpu_seconds",
            "fine_tuned_model",
        ):
            cells = figures.locator(f'tr[data-figure="{figure}"] td')
            expect(cells).to_have_count(2)
            for text in cells.all_inner_texts():
                assert text.strip() not in ("", "—") and not text.startswith("0s"), (figure, text)

        save_screenshot(page, tmp_path, "dashboard-compare.png")

        # The options all the jobs share, once opened (after the screenshot: it stays short).
        same.locator("summary").click()
        expect(same.locator('tr[data-option="model"]')).to_contain_text("tiny-random-llama")

        # A job's name in the table leads back to its page.
        page.locator("#compared").get_by_role("link", name=fast).click()
        expect(page).to_have_url(f"{live_api}/jobs/{fast}")
    except Exception:
        page.screenshot(path=str(tmp_path / "dashboard-compare-failure.png"), full_page=True)
        raise
    finally:
        context.close()
