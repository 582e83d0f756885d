"""The dashboard's admin pages (app/web/admin_pages.py) in-process on Postgres, Redis and
S3: sign-in with an admin key, each page, each action through the admin services (audited
with the admin key as actor, refused without the CSRF token, a refusal's message on its
field), a new key shown once, and no admin page for a team's session (nor a team page for
an admin's).

The browser is a TestClient of its own per test, as in tests/api/test_dashboard.py; the run
in Chromium is tests/e2e/test_dashboard_admin.py."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.models import AdminKey, ApiKey, AuditEntry, Team, Worker
from app.services import audit
from app.services.admin_keys import create_admin_key
from app.web.auth import COOKIE
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT
from tests.api.test_dashboard import browser_for, create_job, csrf_of, signed_in

ADMIN_PAGES = ["/admin", "/admin/teams", "/admin/workers", "/admin/queue", "/admin/audit"]


@dataclass
class Admin:
    id: str
    name: str
    key: str

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.id})"  # app.services.audit.actor_of


@pytest.fixture
def admin(sessions) -> Admin:
    name = f"ops-{uuid.uuid4().hex[:6]}"
    with sessions() as session:
        record, key = create_admin_key(session, name)
    return Admin(record.id, name, key)


@pytest.fixture
def admin_browser(api, admin) -> Iterator[TestClient]:
    with browser_for(api) as browser:
        resp = browser.post("/login", data={"key": admin.key})
        assert (resp.status_code, resp.headers["location"]) == (303, "/admin/teams")
        yield browser


def audit_of(sessions, target: str) -> list[AuditEntry]:
    """The target's audit entries, newest first."""
    with sessions() as session:
        return list(
            session.scalars(
                select(AuditEntry).where(AuditEntry.target == target).order_by(AuditEntry.pk.desc())
            )
        )


def team_row(sessions, team_id: str) -> Team:
    with sessions() as session:
        return session.scalar(select(Team).where(Team.id == team_id))


def team_form(browser: TestClient, team_id: str, **fields: str) -> dict[str, str]:
    """The team form as the page fills it, with `fields` changed (None: unticked)."""
    html = browser.get(f"/admin/teams/{team_id}").text
    form = {"csrf": csrf_of(html)}
    for name in ("weight", "max_running_jobs", "max_queued_jobs", "max_file_bytes"):
        form[name] = re.search(rf'name="{name}" value="([^"]*)"', html).group(1)
    form["gpu_hours_per_month"] = re.search(
        r'name="gpu_hours_per_month" value="([^"]*)"', html
    ).group(1)
    for flag in ("preemptible", "disabled"):
        if re.search(rf'name="{flag}" id="f-{flag}" checked', html):
            form[flag] = "on"
    for name, value in fields.items():
        if value is None:
            form.pop(name, None)
        else:
            form[name] = value
    return form


# --- sign-in ------------------------------------------------------------------------------


def test_an_admin_key_signs_in_to_the_admin_pages(api, admin, team) -> None:
    browser = browser_for(api)
    resp = browser.post("/login", data={"key": f" {admin.key}\n", "next": "/admin/audit"})
    assert (resp.status_code, resp.headers["location"]) == (303, "/admin/audit")
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = browser.get("/admin/teams")
    assert page.status_code == 200
    assert f'data-team="{team.id}"' in page.text
    assert f"admin: {admin.name}" in page.text
    # A team page asked for: the admin's own home instead.
    login = browser_for(api).post("/login", data={"key": admin.key, "next": "/jobs"})
    assert login.headers["location"] == "/admin/teams"


def test_signed_out_an_admin_page_goes_to_sign_in_and_back(api, admin) -> None:
    browser = browser_for(api)
    resp = browser.get("/admin/workers")
    assert resp.headers["location"] == "/login?next=/admin/workers"
    login = browser.post("/login", data={"key": admin.key, "next": "/admin/workers"})
    assert login.headers["location"] == "/admin/workers"
    assert browser.get("/admin/workers").status_code == 200


def test_an_admin_session_reaches_no_team_page(admin_browser) -> None:
    assert admin_browser.get("/").headers["location"] == "/admin/teams"
    for path in ("/jobs", "/pool", "/usage", "/jobs/new", "/files"):
        resp = admin_browser.get(path)
        assert resp.status_code == 303, path  # no team: the sign-in page, which sends it home
        assert resp.headers["location"].startswith("/login?next=")
        assert admin_browser.get(resp.headers["location"]).headers["location"] == "/admin/teams"


@pytest.mark.parametrize("path", [*ADMIN_PAGES, "/admin/teams/{team}"])
def test_a_team_session_gets_no_admin_page(api, team, path) -> None:
    with signed_in(api, team.key) as browser:
        resp = browser.get(path.format(team=team.id))
        assert resp.status_code == 404
        assert "No such page." in resp.text
        assert "admin-" not in resp.text  # no admin table, form or navigation
        assert 'href="/admin' not in resp.text
        assert team.id in resp.text  # the team's own page frame


def test_a_team_session_changes_nothing_through_the_admin_forms(
    api, team, other_team, sessions, worker_id
) -> None:
    with signed_in(api, team.key) as browser:
        token = csrf_of(browser.get("/jobs").text)  # the team session's own, valid token
        posts = [
            (f"/admin/teams/{other_team.id}", {"weight": "9", "max_queued_jobs": "0"}),
            (f"/admin/teams/{other_team.id}/keys", {}),
            (f"/admin/teams/{other_team.id}/keys/rotate", {}),
            (f"/admin/workers/{worker_id}/drain", {}),
        ]
        for path, data in posts:
            resp = browser.post(path, data={**data, "csrf": token})
            assert resp.status_code == 404, path
            assert "lathe-" not in resp.text.replace("lathe-…", "")  # no key shown
    assert team_row(sessions, other_team.id).weight == 1.0
    assert audit_of(sessions, other_team.id) == []
    assert other_team.get("/v1/files").status_code == 200  # its key was not rotated
    with sessions() as session:
        assert session.scalar(select(Worker.status).where(Worker.id == worker_id)) == "active"


def test_a_revoked_admin_key_ends_the_session(admin_browser, admin, sessions) -> None:
    assert admin_browser.get("/admin/teams").status_code == 200
    with sessions() as session:
        session.execute(
            update(AdminKey).where(AdminKey.id == admin.id).values(revoked_at=int(time.time()))
        )
        session.commit()
    assert admin_browser.get("/admin/teams").headers["location"] == "/login?next=/admin/teams"


def test_logout_of_an_admin_session_needs_its_token(admin_browser) -> None:
    html = admin_browser.get("/admin/teams").text
    token = csrf_of(html)
    assert admin_browser.post("/logout", data={"csrf": "0" * 40}).status_code == 303
    assert admin_browser.get("/admin/teams").status_code == 200  # still signed in
    resp = admin_browser.post("/logout", data={"csrf": token})
    assert resp.headers["location"] == "/login"
    assert admin_browser.get("/admin/teams").status_code == 303


# --- the pages ----------------------------------------------------------------------------


def test_each_admin_page_renders(admin_browser, team, sessions, worker_id) -> None:
    job = create_job(team)  # queued: no scheduler runs in these tests
    teams = admin_browser.get("/admin/teams")
    assert teams.status_code == 200
    row = re.search(rf'<tr data-team="{team.id}">(.*?)</tr>', teams.text, re.S).group(1)
    assert "(default)" in row and "enabled" in row
    assert teams.headers["content-security-policy"].startswith("default-src 'none'")
    assert teams.headers["cache-control"] == "no-store"

    page = admin_browser.get(f"/admin/teams/{team.id}")
    assert page.status_code == 200
    assert 'id="team-form"' in page.text and 'id="team-keys"' in page.text
    with sessions() as session:
        prefix = session.scalar(
            select(ApiKey.prefix).join(Team, Team.pk == ApiKey.team_pk).where(Team.id == team.id)
        )
    assert f"<code>{prefix}…</code>" in page.text
    assert team.key not in page.text

    workers = admin_browser.get("/admin/workers")
    assert workers.status_code == 200
    worker_row = re.search(
        rf'<tr data-worker="{re.escape(worker_id)}">(.*?)</tr>', workers.text, re.S
    )
    assert "worker-active" in worker_row.group(1) and "Drain" in worker_row.group(1)

    queue = admin_browser.get("/admin/queue")
    assert queue.status_code == 200
    waiting = re.search(rf'<tr data-job="{job["id"]}">(.*?)</tr>', queue.text, re.S).group(1)
    assert re.search(r"#\d+", waiting)  # its place in line
    assert f'href="/admin/teams/{team.id}"' in waiting

    audit = admin_browser.get("/admin/audit")
    assert audit.status_code == 200 and 'id="admin-audit"' in audit.text

    assert admin_browser.get("/admin").headers["location"] == "/admin/teams"
    assert admin_browser.get("/admin/teams/team-nope").status_code == 404


def test_the_audit_log_pages_back(admin_browser, admin, sessions) -> None:
    target = f"paging-{uuid.uuid4().hex[:6]}"
    with sessions() as session:
        for n in range(55):
            audit.record(session, admin.actor, "test.paging", target, {"n": n})
        session.commit()
    first = admin_browser.get("/admin/audit").text
    ids = re.findall(r'<tr data-entry="([^"]+)">', first)
    assert len(ids) == 50
    assert first.count(target) == 50  # the newest 50 are these, newest first
    assert "{&#34;n&#34;: 54}" in first
    older = re.search(r'id="audit-older" href="([^"]+)"', first).group(1)
    assert older == f"/admin/audit?after={ids[-1]}"
    second = admin_browser.get(older).text
    assert re.findall(r'<tr data-entry="([^"]+)">', second)[:5] == [
        e.id for e in audit_of(sessions, target)[50:55]
    ]
    # A cursor that is no entry's: the first page.
    again = admin_browser.get("/admin/audit?after=x").text
    assert re.findall(r'<tr data-entry="([^"]+)">', again) == ids


# --- team settings ------------------------------------------------------------------------


def test_a_quota_changed_on_the_page_is_audited_and_refuses_the_next_job(
    admin_browser, admin, team, sessions
) -> None:
    form = team_form(admin_browser, team.id, max_queued_jobs="0")
    resp = admin_browser.post(f"/admin/teams/{team.id}", data=form)
    assert (resp.status_code, resp.headers["location"]) == (
        303,
        f"/admin/teams/{team.id}?notice=team_saved",
    )
    assert "The team&#39;s settings were saved." in admin_browser.get(resp.headers["location"]).text
    entries = audit_of(sessions, team.id)
    assert [(e.actor, e.action, e.details) for e in entries] == [
        (admin.actor, "team.update", {"max_queued_jobs": 0})  # only the field changed
    ]
    train = team.upload(CHAT).json()["id"]
    refused = team.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny-random-llama", "training_file": train}
    )
    assert refused.status_code == 429
    assert refused.json()["error"]["param"] == "max_queued_jobs"
    # Blank again: the deployment's default, and the team may queue once more.
    form = team_form(admin_browser, team.id, max_queued_jobs="")
    assert admin_browser.post(f"/admin/teams/{team.id}", data=form).status_code == 303
    assert team_row(sessions, team.id).max_queued_jobs is None
    assert audit_of(sessions, team.id)[0].details == {"max_queued_jobs": None}


def test_weight_flags_and_quotas_are_set_and_disable_locks_the_team_out(
    admin_browser, admin, team, sessions
) -> None:
    form = team_form(
        admin_browser,
        team.id,
        weight="2.5",
        gpu_hours_per_month="12",
        max_file_bytes="1000000",
        preemptible=None,
        disabled="on",
    )
    assert admin_browser.post(f"/admin/teams/{team.id}", data=form).status_code == 303
    row = team_row(sessions, team.id)
    assert (row.weight, row.gpu_hours_per_month, row.max_file_bytes) == (2.5, 12.0, 1_000_000)
    assert (row.preemptible, row.disabled) == (False, True)
    assert audit_of(sessions, team.id)[0].details == {
        "weight": 2.5,
        "gpu_hours_per_month": 12,
        "max_file_bytes": 1_000_000,
        "preemptible": False,
        "disabled": True,
    }
    assert team.get("/v1/files").status_code == 403  # team_disabled, as the API's PATCH does
    listed = admin_browser.get("/admin/teams").text
    row_html = re.search(rf'<tr data-team="{team.id}">(.*?)</tr>', listed, re.S).group(1)
    assert "disabled" in row_html and "<strong>no</strong>" in row_html and "of 12" in row_html
    form = team_form(admin_browser, team.id, disabled=None)
    assert admin_browser.post(f"/admin/teams/{team.id}", data=form).status_code == 303
    assert team.get("/v1/files").status_code == 200


def test_an_unchanged_form_is_no_change_and_not_audited(admin_browser, team, sessions) -> None:
    resp = admin_browser.post(f"/admin/teams/{team.id}", data=team_form(admin_browser, team.id))
    assert resp.headers["location"] == f"/admin/teams/{team.id}?notice=team_unchanged"
    assert audit_of(sessions, team.id) == []


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("weight", "-1", "weight must be a number above 0, at most 1000000"),
        ("weight", "", "weight must be a number above 0, at most 1000000"),
        ("weight", "nan", "weight must be a number above 0, at most 1000000"),
        ("max_queued_jobs", "abc", "max_queued_jobs must be an integer"),
        ("max_running_jobs", "1.5", "max_running_jobs must be an integer"),
        ("gpu_hours_per_month", "1e30", "gpu_hours_per_month must be a number from 0 to 10000000"),
    ],
)
def test_a_refused_value_shows_the_services_message_on_its_field(
    admin_browser, team, sessions, field, value, message
) -> None:
    form = team_form(admin_browser, team.id, **{field: value})
    resp = admin_browser.post(f"/admin/teams/{team.id}", data=form)
    assert resp.status_code == 400
    shown = re.search(rf'<p class="field-error" id="e-{field}" role="alert">([^<]*)</p>', resp.text)
    assert shown and shown.group(1) == message
    assert f'name="{field}" value="{value}" inputmode="decimal" aria-invalid="true"' in resp.text
    assert resp.text.count('class="field-error"') == 1  # on that field only
    assert audit_of(sessions, team.id) == []
    assert team_row(sessions, team.id).weight == 1.0


# --- keys ---------------------------------------------------------------------------------


def test_an_issued_key_is_shown_once_works_and_is_audited(
    admin_browser, admin, team, sessions
) -> None:
    token = csrf_of(admin_browser.get(f"/admin/teams/{team.id}").text)
    resp = admin_browser.post(f"/admin/teams/{team.id}/keys", data={"csrf": token})
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    key = re.search(r'<code id="new-key">([^<]+)</code>', resp.text).group(1)
    key_id = re.search(r'id="new-key-id">([^<]+)<', resp.text).group(1)
    assert TeamClient(team.id, key, team.client).get("/v1/files").status_code == 200
    assert team.get("/v1/files").status_code == 200  # issuing keeps the others
    for path in (f"/admin/teams/{team.id}", "/admin/teams", "/admin/audit"):
        assert key not in admin_browser.get(path).text  # never shown again
    [entry] = audit_of(sessions, key_id)
    assert (entry.actor, entry.action) == (admin.actor, "key.issue")
    assert key not in str(entry.details)


def test_rotate_revokes_the_old_keys_and_shows_the_new_one_once(
    admin_browser, admin, team, sessions
) -> None:
    token = csrf_of(admin_browser.get(f"/admin/teams/{team.id}").text)
    resp = admin_browser.post(f"/admin/teams/{team.id}/keys/rotate", data={"csrf": token})
    assert resp.status_code == 200 and "Keys rotated" in resp.text
    new_key = re.search(r'<code id="new-key">([^<]+)</code>', resp.text).group(1)
    assert team.get("/v1/files").status_code == 401
    assert TeamClient(team.id, new_key, team.client).get("/v1/files").status_code == 200
    [entry] = audit_of(sessions, team.id)
    assert (entry.actor, entry.action) == (admin.actor, "keys.rotate")
    assert new_key not in admin_browser.get(f"/admin/teams/{team.id}").text


def test_revoke_a_key_and_a_refusal_is_shown(
    admin_browser, admin, team, other_team, sessions
) -> None:
    page = admin_browser.get(f"/admin/teams/{team.id}").text
    token = csrf_of(page)
    key_id = re.search(r'<tr data-key="([^"]+)">', page).group(1)
    resp = admin_browser.post(f"/admin/teams/{team.id}/keys/{key_id}/revoke", data={"csrf": token})
    assert resp.headers["location"] == f"/admin/teams/{team.id}?notice=key_revoked#keys"
    assert team.get("/v1/files").status_code == 401
    [entry] = audit_of(sessions, key_id)
    assert (entry.actor, entry.action) == (admin.actor, "key.revoke")
    # Again: the service's 409, on the page.
    again = admin_browser.post(f"/admin/teams/{team.id}/keys/{key_id}/revoke", data={"csrf": token})
    assert again.status_code == 409
    assert f"API key {key_id} is already revoked" in again.text
    # Another team's key through this team's page: not found, and still valid.
    other_page = admin_browser.get(f"/admin/teams/{other_team.id}").text
    other_key = re.search(r'<tr data-key="([^"]+)">', other_page).group(1)
    wrong = admin_browser.post(
        f"/admin/teams/{team.id}/keys/{other_key}/revoke", data={"csrf": token}
    )
    assert wrong.status_code == 404
    assert other_team.get("/v1/files").status_code == 200


# --- workers ------------------------------------------------------------------------------


def test_drain_and_undrain_a_worker_audited(admin_browser, admin, worker_id, sessions) -> None:
    token = csrf_of(admin_browser.get("/admin/workers").text)
    resp = admin_browser.post(f"/admin/workers/{worker_id}/drain", data={"csrf": token})
    assert resp.headers["location"] == "/admin/workers?notice=worker_drained"
    page = admin_browser.get(resp.headers["location"]).text
    row = re.search(rf'<tr data-worker="{re.escape(worker_id)}">(.*?)</tr>', page, re.S).group(1)
    assert "worker-draining" in row and "Undrain" in row
    resp = admin_browser.post(f"/admin/workers/{worker_id}/undrain", data={"csrf": token})
    assert resp.headers["location"] == "/admin/workers?notice=worker_undrained"
    assert [(e.actor, e.action, e.details) for e in audit_of(sessions, worker_id)] == [
        (admin.actor, "worker.undrain", {"from": "draining", "to": "active"}),
        (admin.actor, "worker.drain", {"from": "active", "to": "draining"}),
    ]


def test_draining_a_lost_worker_shows_the_services_refusal(
    admin_browser, worker_id, sessions
) -> None:
    with sessions() as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(status="lost"))
        session.commit()
    token = csrf_of(admin_browser.get("/admin/workers").text)
    resp = admin_browser.post(f"/admin/workers/{worker_id}/drain", data={"csrf": token})
    assert resp.status_code == 409
    row = re.search(rf'<tr data-worker="{re.escape(worker_id)}">(.*?)</tr>', resp.text, re.S)
    assert f"worker {worker_id} is lost; only a live worker can be drained" in row.group(1)
    assert audit_of(sessions, worker_id) == []
    missing = admin_browser.post("/admin/workers/nope@host/drain", data={"csrf": token})
    assert missing.status_code == 404 and "no worker with id" in missing.text


# --- CSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "0" * 40, "team"])
def test_every_admin_form_is_refused_without_the_sessions_token(
    api, admin_browser, team, sessions, worker_id, token
) -> None:
    if token == "team":  # a team session's valid token is not the admin session's
        with signed_in(api, team.key) as browser:
            token = csrf_of(browser.get("/jobs").text)
    data = {} if token is None else {"csrf": token}
    page = admin_browser.get(f"/admin/teams/{team.id}").text
    key_id = re.search(r'<tr data-key="([^"]+)">', page).group(1)
    posts = [
        (f"/admin/teams/{team.id}", {"weight": "7", "max_queued_jobs": "0"}),
        (f"/admin/teams/{team.id}/keys", {}),
        (f"/admin/teams/{team.id}/keys/rotate", {}),
        (f"/admin/teams/{team.id}/keys/{key_id}/revoke", {}),
        (f"/admin/workers/{worker_id}/drain", {}),
    ]
    for path, fields in posts:
        resp = admin_browser.post(path, data={**fields, **data})
        assert resp.status_code == 303, path
        assert resp.headers["location"].endswith("?notice=bad_csrf"), path
    assert (
        "The form had expired" in admin_browser.get(f"/admin/teams/{team.id}?notice=bad_csrf").text
    )
    assert team_row(sessions, team.id).weight == 1.0
    assert audit_of(sessions, team.id) == [] and audit_of(sessions, key_id) == []
    assert audit_of(sessions, worker_id) == []
    assert team.get("/v1/files").status_code == 200  # not rotated, not revoked
    with sessions() as session:
        keys = session.scalars(
            select(ApiKey.id).join(Team, Team.pk == ApiKey.team_pk).where(Team.id == team.id)
        ).all()
    assert keys == [key_id]  # none issued


def test_a_logout_without_its_token_keeps_an_admin_on_the_admin_pages(admin_browser) -> None:
    resp = admin_browser.post("/logout", data={"csrf": "forged"})
    assert resp.headers["location"] == "/admin/teams?notice=bad_csrf"
    assert "The form had expired" in admin_browser.get(resp.headers["location"]).text
