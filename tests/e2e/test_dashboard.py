"""The web dashboard in a real headless browser: Playwright drives Debian's Chromium
(/usr/bin/chromium, apt package `chromium`, installed by `make test`; no Playwright browser
download) against the production-shaped stack of tests/e2e/conftest.py.

A small QLoRA job with a validation file runs to success on a real worker; then the browser
logs in with the team key, finds the job in the list, opens its page (loss chart with a
train and a validation line, stats, events, checkpoints), downloads the adapter, and visits
the pool and usage pages. A full-page screenshot of the job page is saved under the test's
tmp dir, and also into $LATHE_SCREENSHOT_DIR when set (README's docs/images/
dashboard-job.png is made that way)."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import create_team_key
from tests.e2e.conftest import LARGE, SMALL, save_screenshot, submit, team_client, upload, wait_for

pytestmark = pytest.mark.slow
TIMEOUT_MS = 15_000
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def team_key(live_api: str, e2e_env: dict[str, str], workers) -> str:
    return create_team_key(e2e_env, "dashboard")[1]


@pytest.fixture(scope="module")
def api(live_api: str, team_key: str) -> Iterator[httpx.Client]:
    with team_client(live_api, team_key) as client:
        yield client


@pytest.fixture(scope="module")
def finished_job(api: httpx.Client) -> str:
    """A small chat job with a validation file, so the chart has both lines."""
    job_id = submit(
        api,
        upload(api, "sample_chat.jsonl"),
        n_epochs=2,
        validation_file=upload(api, "sample_chat_valid.jsonl"),
        suffix="dashboard",
        metadata={"ticket": "DASH-1"},
        seed=5,
    )

    def final():
        job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job if job["status"] in FINAL else None

    job = wait_for(final, 300, what="the dashboard's job to finish")
    assert job["status"] == "succeeded", job["error"]
    # The worker meters the run's GPU time just after it publishes the result.
    wait_for(lambda: api.get("/v1/usage").json()["gpu_seconds"] > 0, 30, what="the job's GPU time")
    return job_id


def points(polyline) -> list[tuple[float, float]]:
    raw = polyline.get_attribute("points") or ""
    return [tuple(map(float, pair.split(","))) for pair in raw.split()]


def test_dashboard_in_chromium(
    chromium, live_api: str, team_key: str, finished_job: str, workers, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    context = chromium.new_context(
        base_url=live_api, viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    try:
        # Not signed in: the login page, which refuses a wrong key.
        page.goto("/")
        expect(page).to_have_url(re.compile(r"/login"))
        page.get_by_label("Team API key").fill("lathe-wrong")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_have_text("Invalid or revoked API key.")

        page.get_by_label("Team API key").fill(team_key)
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(f"{live_api}/jobs")
        row = page.locator(f'tr[data-job="{finished_job}"]')
        expect(row.locator(".status")).to_have_text("succeeded")
        cookie = next(c for c in context.cookies() if c["name"] == "lathe_dashboard")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # The job page: chart, stats, options, checkpoints, events.
        row.get_by_role("link", name=finished_job).click()
        expect(page).to_have_url(f"{live_api}/jobs/{finished_job}")
        expect(page.locator("#job-status")).to_have_text("succeeded")
        chart = page.locator("svg#loss-chart")
        expect(chart).to_be_visible()
        train = points(chart.locator('polyline[data-series="train"]'))
        valid = points(chart.locator('polyline[data-series="valid"]'))
        assert len(train) >= 10, train
        assert len(valid) >= 2, valid
        expect(chart.locator("circle.dot.valid")).to_have_count(len(valid))
        expect(chart).to_contain_text("train loss")
        expect(chart).to_contain_text("validation loss")
        expect(page.locator("#stats")).to_contain_text("Trainable parameters")
        expect(page.locator("#stats")).to_contain_text("tokens/s")
        expect(page.locator("#sample-completion")).to_be_attached()
        expect(page.locator("#options")).to_contain_text("training.packing")
        expect(page.locator("#progress")).to_contain_text("DASH-1")
        expect(page.locator("#checkpoints tbody tr")).to_have_count(2)  # one per epoch
        expect(page.locator("#events")).to_contain_text("The job has successfully completed")
        expect(page.locator("#events")).to_contain_text("Checkpoint saved at step")
        expect(page.locator("#cancel-job")).to_have_count(0)

        save_screenshot(page, tmp_path, "dashboard-job.png")

        # The adapter, streamed from object storage.
        with page.expect_download() as info:
            page.locator("#download-adapter").click()
        download = info.value
        assert download.suggested_filename == "adapter.tar.gz"
        saved = tmp_path / "adapter.tar.gz"
        download.save_as(saved)
        data = saved.read_bytes()
        assert data[:2] == b"\x1f\x8b"  # gzip
        gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())

        # The pool: both workers; then the usage, with this job's metered GPU time.
        page.get_by_role("link", name="Pool", exact=True).click()
        expect(page).to_have_url(f"{live_api}/pool")
        for gpu_class in (SMALL, LARGE):
            expect(page.locator(f'#workers tr[data-worker="{workers[gpu_class]}"]')).to_be_visible()
        page.screenshot(path=str(tmp_path / "dashboard-pool.png"), full_page=True)
        page.get_by_role("link", name="Usage", exact=True).click()
        expect(page).to_have_url(f"{live_api}/usage")
        expect(page.locator("#gpu-hours")).to_be_visible()
        assert float(page.locator("#gpu-hours").inner_text().replace(",", "")) > 0
        expect(page.locator("#usage-jobs")).to_contain_text(finished_job)
        page.screenshot(path=str(tmp_path / "dashboard-usage.png"), full_page=True)

        # Log out: the pages send you to the login page again.
        page.get_by_role("button", name="Log out").click()
        expect(page).to_have_url(re.compile(r"/login$"))
        page.goto(f"/jobs/{finished_job}")
        expect(page).to_have_url(re.compile(r"/login\?next="))
    except Exception:
        page.screenshot(path=str(tmp_path / "dashboard-failure.png"), full_page=True)
        raise
    finally:
        context.close()
