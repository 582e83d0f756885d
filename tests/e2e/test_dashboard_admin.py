"""The admin pages in a real headless browser (Debian's Chromium through Playwright, as
tests/e2e/test_dashboard.py) against the production-shaped stack of tests/e2e/conftest.py.

Signed in with an admin key: a team's queued-jobs quota set to 0 on its page, and that
team's next job, submitted over the team API, refused naming the quota; the team's keys
rotated (the old key refused, the new one, shown once, works); one of the stack's two
workers drained and undrained from the workers page (the team API sees it draining, and
it is active again before the test ends, for the tests that follow); the queue and the
audit log with the admin's entries. Signed in with a team key, no admin page is there.
Screenshots of each admin page are saved under the test's tmp dir, and into
$LATHE_SCREENSHOT_DIR when set."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.db import make_engine, make_sessionmaker
from app.services.admin_keys import create_admin_key
from tests.conftest import create_team_key
from tests.e2e.conftest import SMALL, save_screenshot, team_client, upload, wait_for

pytestmark = pytest.mark.slow
TIMEOUT_MS = 15_000
ADMIN_NAME = "e2e-dashboard-admin"


@pytest.fixture(scope="module")
def admin_key(live_api: str, e2e_env: dict[str, str]) -> str:
    engine = make_engine(e2e_env["LATHE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        _, key = create_admin_key(session, ADMIN_NAME)
    engine.dispose()
    return key


@pytest.fixture(scope="module")
def admin_api(live_api: str, admin_key: str) -> Iterator[httpx.Client]:
    """The admin API, for setting up and for undoing what a failed test left."""
    with team_client(live_api, admin_key) as client:
        yield client


@pytest.fixture
def team(live_api: str, e2e_env: dict[str, str], workers) -> tuple[str, str]:
    """A team of this test's own: (id, key)."""
    return create_team_key(e2e_env, "admin-page")


@pytest.fixture
def browser_page(chromium, live_api: str, tmp_path: Path):
    """A fresh browser context's page; its last state is saved for a failure's post-mortem."""
    from playwright.sync_api import expect

    context = chromium.new_context(base_url=live_api, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        page.screenshot(path=str(tmp_path / "last-state.png"), full_page=True)
        context.close()


def sign_in(page, key: str) -> None:
    page.goto("/login")
    page.get_by_label("Team API key").fill(key)
    page.get_by_role("button", name="Log in").click()


def test_an_admin_sets_a_quota_and_the_teams_next_job_is_refused(
    browser_page, live_api: str, admin_key: str, team, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    team_id, team_key = team
    page = browser_page
    sign_in(page, admin_key)
    expect(page).to_have_url(f"{live_api}/admin/teams")
    expect(page.locator(".admin-badge")).to_have_text(f"admin: {ADMIN_NAME}")
    row = page.locator(f'#admin-teams tr[data-team="{team_id}"]')
    expect(row).to_contain_text("enabled")
    save_screenshot(page, tmp_path, "dashboard-admin-teams.png")

    row.get_by_role("link").click()
    expect(page).to_have_url(f"{live_api}/admin/teams/{team_id}")
    page.get_by_label("Max queued jobs").fill("0")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_have_text("The team's settings were saved.")
    expect(page.get_by_label("Max queued jobs")).to_have_value("0")
    save_screenshot(page, tmp_path, "dashboard-admin-team.png")

    with team_client(live_api, team_key) as api:
        file_id = upload(api)
        resp = api.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-random-llama", "training_file": file_id},
        )
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["param"] == "max_queued_jobs"
    assert "max_queued_jobs" in error["message"]

    # A value the service refuses: its message on the field, nothing saved.
    page.get_by_label("Weight").fill("-1")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#e-weight")).to_have_text(
        "weight must be a number above 0, at most 1000000"
    )
    expect(page.get_by_label("Weight")).to_have_attribute("aria-invalid", "true")

    # The audit log: the change, with this admin key as its actor.
    page.get_by_role("link", name="Audit log").click()
    entry = page.locator("#admin-audit tbody tr", has_text=team_id).first
    expect(entry.locator(".action")).to_have_text("team.update")
    expect(entry.locator(".actor")).to_contain_text(ADMIN_NAME)
    expect(entry.locator(".details")).to_contain_text('"max_queued_jobs": 0')
    save_screenshot(page, tmp_path, "dashboard-admin-audit.png")


def test_an_admin_rotates_a_teams_keys(
    browser_page, live_api: str, admin_key: str, team, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    team_id, old_key = team
    page = browser_page
    sign_in(page, admin_key)
    page.goto(f"/admin/teams/{team_id}")
    page.get_by_role("button", name=re.compile("^Rotate")).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Keys rotated")
    new_key = page.locator("#new-key").inner_text().strip()
    assert new_key.startswith("lathe-") and new_key != old_key
    save_screenshot(page, tmp_path, "dashboard-admin-key.png")

    with team_client(live_api, old_key) as old, team_client(live_api, new_key) as new:
        assert old.get("/v1/files").status_code == 401
        assert new.get("/v1/files").status_code == 200

    # Shown once: the team's page lists the keys by prefix only.
    page.get_by_role("link", name="Back to the team").click()
    expect(page.locator("#team-keys tbody tr")).to_have_count(2)
    expect(page.locator("#team-keys")).to_contain_text("active")
    assert new_key not in page.content()


def test_an_admin_drains_and_undrains_a_worker(
    browser_page, live_api: str, admin_key: str, admin_api: httpx.Client, team, workers, tmp_path
) -> None:
    from playwright.sync_api import expect

    worker = workers[SMALL]
    _, team_key = team
    page = browser_page
    sign_in(page, admin_key)
    try:
        page.get_by_role("link", name="Workers").click()
        row = page.locator(f'#admin-workers tr[data-worker="{worker}"]')
        expect(row.locator(".status")).to_have_text("active")
        row.get_by_role("button", name="Drain", exact=True).click()
        expect(page.get_by_role("status")).to_contain_text("The worker is draining")
        expect(row.locator(".status")).to_have_text(re.compile("^(draining|drained)$"))
        save_screenshot(page, tmp_path, "dashboard-admin-workers.png")

        with team_client(live_api, team_key) as api:

            def seen_draining() -> bool:
                rows = api.get("/v1/workers").json()["data"]
                return any(
                    w["id"] == worker and w["status"] in ("draining", "drained") for w in rows
                )

            wait_for(seen_draining, 30, what="the team API to see the worker draining")

        page.get_by_role("link", name="Queue").click()
        expect(page.get_by_role("heading", name="The whole queue")).to_be_visible()
        save_screenshot(page, tmp_path, "dashboard-admin-queue.png")

        page.get_by_role("link", name="Workers").click()
        row.get_by_role("button", name="Undrain", exact=True).click()
        expect(page.get_by_role("status")).to_contain_text("back in the pool")
        expect(row.locator(".status")).to_have_text("active")
        page.get_by_role("link", name="Audit log").click()
        latest = page.locator("#admin-audit tbody tr", has_text=worker)
        expect(latest.first.locator(".action")).to_have_text("worker.undrain")
        expect(latest.nth(1).locator(".action")).to_have_text("worker.drain")
    finally:  # the shared worker takes jobs again, whatever happened above
        admin_api.post(f"/v1/admin/workers/{worker}/undrain")

    def active() -> bool:
        with team_client(live_api, team_key) as api:
            data = api.get("/v1/workers").json()["data"]
        return any(w["id"] == worker and w["status"] == "active" for w in data)

    wait_for(active, 30, what="the worker to be active again")


def test_a_team_reaches_no_admin_page(browser_page, live_api: str, team, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    team_id, team_key = team
    page = browser_page
    sign_in(page, team_key)
    expect(page).to_have_url(f"{live_api}/jobs")
    expect(page.locator("header nav a[href^='/admin']")).to_have_count(0)
    pages = ["/admin", "/admin/teams", f"/admin/teams/{team_id}", "/admin/workers"]
    for path in [*pages, "/admin/queue", "/admin/audit"]:
        response = page.goto(path)
        assert response is not None and response.status == 404, path
        expect(page.get_by_role("heading", level=1)).to_have_text("Not found")
        expect(page.locator("table")).to_have_count(0)
        expect(page.locator("form[action*='/admin/']")).to_have_count(0)
    save_screenshot(page, tmp_path, "dashboard-admin-refused.png")
