"""The launch form in a real headless browser (Debian's Chromium through Playwright, as
tests/e2e/test_dashboard.py) against the production-shaped stack of tests/e2e/conftest.py.

From the browser: upload a dataset (sent by static/upload.js with XMLHttpRequest, so the
progress bar has something to show) and read the server's verdict, check the memory
estimate, submit a small tiny-random-llama job and watch it succeed on a real worker; a
refused file shows its line (with JavaScript off: the plain form); a field's error shows
on that field; a job's page clones it into the form. A full-page screenshot of the form is
saved under the test's tmp dir, and into $LATHE_SCREENSHOT_DIR when set (the README's
docs/images/dashboard-launch.png)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import create_team_key
from tests.e2e.conftest import DATA, LARGE, save_screenshot, submit, team_client, upload

pytestmark = pytest.mark.slow
TIMEOUT_MS = 15_000
TRAINING_MS = 300_000
MODEL = "tiny-random-llama"
BAD = b"".join((DATA / "sample_chat.jsonl").read_bytes().splitlines(keepends=True)[:2])
BAD += b'{"messages": [{"role": "user", "content": "no answer"}]}\n'


@pytest.fixture(scope="module")
def team_key(live_api: str, e2e_env: dict[str, str], workers) -> str:
    return create_team_key(e2e_env, "launch")[1]


@pytest.fixture(scope="module")
def api(live_api: str, team_key: str) -> Iterator[httpx.Client]:
    with team_client(live_api, team_key) as client:
        yield client


@pytest.fixture
def signed_in(chromium, live_api: str, team_key: str, tmp_path: Path):
    """Opens signed-in pages (JavaScript on unless asked otherwise); each page's last
    state is saved as a screenshot in the test's tmp dir, for a failure's post-mortem."""
    from playwright.sync_api import expect

    contexts = []

    def open_page(javascript: bool = True):
        context = chromium.new_context(
            base_url=live_api,
            viewport={"width": 1280, "height": 900},
            java_script_enabled=javascript,
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.goto("/login")
        page.get_by_label("Team API key").fill(team_key)
        page.get_by_role("button", name="Log in").click()
        expect(page).to_have_url(f"{live_api}/jobs")
        return page

    expect.set_options(timeout=TIMEOUT_MS)
    try:
        yield open_page
    finally:
        for n, context in enumerate(contexts):
            for page in context.pages:
                page.screenshot(path=str(tmp_path / f"launch-last-{n}.png"), full_page=True)
            context.close()


def test_upload_check_and_launch_a_job_to_success(signed_in, live_api: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = signed_in()
    page.get_by_role("link", name="New job").click()
    expect(page).to_have_url(f"{live_api}/jobs/new")
    posts = []
    page.on("request", lambda r: posts.append(r.resource_type) if r.method == "POST" else None)

    page.locator("#training_upload").set_input_files(str(DATA / "sample_chat.jsonl"))
    page.locator("#model").select_option(MODEL)
    page.locator("#n_epochs").fill("1")
    page.locator("#batch_size").fill("2")
    page.locator("#max_seq_length").fill("128")
    page.locator("#suffix").fill("from-browser")
    page.get_by_role("button", name="Upload", exact=True).click()
    verdict = page.locator("#verdict-training_upload")
    expect(verdict).to_contain_text("sample_chat.jsonl is valid")
    expect(verdict).to_contain_text("80 examples")
    assert posts == ["xhr"]  # upload.js sent it, with its progress events
    file_id = re.search(r"file-[0-9a-f]+", verdict.inner_text()).group(0)
    expect(page.locator("#training_file")).to_have_value(file_id)
    expect(page.locator("#max_seq_length")).to_have_value("128")  # the rest kept

    page.get_by_role("button", name="Check", exact=True).click()
    expect(page.locator("#memory-gb")).to_be_visible()
    assert float(page.locator("#memory-gb").inner_text()) > 0
    expect(page.locator(f'#fitting-classes tr[data-class="{LARGE}"] td').last).to_have_text("yes")
    save_screenshot(page, tmp_path, "dashboard-launch.png")

    page.get_by_role("button", name="Submit", exact=True).click()
    expect(page).to_have_url(re.compile(rf"{re.escape(live_api)}/jobs/ftjob-[0-9a-f]+$"))
    expect(page.locator("main")).to_contain_text("from-browser")  # the suffix
    # The page reloads itself while the job is active; the worker trains it.
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=TRAINING_MS)
    expect(page.locator("#download-adapter")).to_be_visible()


def test_a_refused_file_shows_its_line_without_javascript(signed_in, api, live_api) -> None:
    from playwright.sync_api import expect

    before = len(api.get("/v1/files").json()["data"])
    page = signed_in(javascript=False)
    page.goto("/jobs/new")
    page.locator("#training_upload").set_input_files(
        {"name": "broken.jsonl", "mimeType": "application/json", "buffer": BAD}
    )
    page.locator("#suffix").fill("kept")
    page.get_by_role("button", name="Upload", exact=True).click()
    verdict = page.locator('[data-field="training_file"] #verdict-training_upload')
    expect(verdict).to_contain_text("broken.jsonl")
    expect(verdict).to_contain_text("line 3")
    expect(page.locator("#suffix")).to_have_value("kept")
    assert len(api.get("/v1/files").json()["data"]) == before


def test_a_field_error_shows_on_its_field(signed_in, api) -> None:
    from playwright.sync_api import expect

    file_id = upload(api, "sample_chat_valid.jsonl")
    page = signed_in()
    page.goto("/jobs/new")
    page.locator("#model").select_option(MODEL)
    page.locator("#training_file").select_option(file_id)
    page.locator("#n_epochs").fill("99")
    page.locator("#lora_r").fill("16")
    page.get_by_role("button", name="Submit", exact=True).click()
    epochs = page.locator('[data-field="n_epochs"]')
    expect(epochs.locator(".field-error")).to_contain_text("less than or equal to 50")
    expect(epochs).to_have_class(re.compile(r"\binvalid\b"))
    expect(page.locator("#n_epochs")).to_have_value("99")
    expect(page.locator("#lora_r")).to_have_value("16")
    expect(page.locator('[data-field="lora_r"] .field-error')).to_have_count(0)
    jobs = api.get("/v1/fine_tuning/jobs").json()["data"]
    assert all(j["training_file"] != file_id for j in jobs)  # nothing was created


def test_clone_a_job_into_the_form(signed_in, api, live_api: str) -> None:
    from playwright.sync_api import expect

    file_id = upload(api, "sample_chat_valid.jsonl")
    job_id = submit(
        api,
        file_id,
        n_epochs=2,
        lora={"r": 4, "alpha": 8},
        suffix="clone-me",
        seed=11,
        priority="low",
    )
    api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")  # its settings are all the test needs
    page = signed_in()
    page.goto(f"/jobs/{job_id}")
    page.get_by_role("link", name="Run again with these settings").click()
    expect(page).to_have_url(f"{live_api}/jobs/new?from={job_id}")
    expect(page.locator("#cloned-from")).to_contain_text(job_id)
    for name, value in {
        "n_epochs": "2",
        "batch_size": "2",
        "max_seq_length": "128",
        "lora_r": "4",
        "lora_alpha": "8",
        "suffix": "clone-me",
        "seed": "11",
        "training_file": file_id,
        "model": MODEL,
        "priority": "low",
    }.items():
        expect(page.locator(f"#{name}")).to_have_value(value)
