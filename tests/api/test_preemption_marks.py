"""Administrators' preemption marks on Postgres: a team's (PATCH /v1/admin/teams/{id}) and a
job's (PATCH /v1/admin/jobs/{id}), shown on the team and job objects, audited, set by the
CLI too, and out of a team's reach."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.cli import app as cli
from app.config import get_settings
from app.models import Job, Team
from app.services.admin_keys import create_admin_key
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT
from tests.api.test_admin import AdminClient, bearer

MODEL = "tiny-random-llama"


@pytest.fixture
def admin(api: TestClient, sessions) -> AdminClient:
    name = f"ops-{uuid.uuid4().hex[:6]}"
    with sessions() as session:
        record, key = create_admin_key(session, name)
    return AdminClient(record.id, name, key, api)


def queued_job(team: TeamClient) -> dict:
    train = team.upload(CHAT).json()["id"]
    created = team.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": train})
    assert created.status_code == 200, created.text
    return created.json()


def team_row(sessions, team_id: str) -> Team:
    with sessions() as session:
        return session.scalar(select(Team).where(Team.id == team_id))


# --- a team's mark ------------------------------------------------------------------------


def test_a_team_is_preemptible_until_an_administrator_marks_it_not(
    admin: AdminClient, team: TeamClient, sessions
) -> None:
    assert admin.get(f"/teams/{team.id}").json()["preemptible"] is True

    marked = admin.patch(f"/teams/{team.id}", json={"preemptible": False})

    assert marked.status_code == 200, marked.text
    assert marked.json()["preemptible"] is False
    assert admin.get(f"/teams/{team.id}").json()["preemptible"] is False
    assert team_row(sessions, team.id).preemptible is False
    # Other fields are kept; the entry holds exactly what was sent.
    assert marked.json()["weight"] == 1.0 and marked.json()["disabled"] is False
    entry = admin.audit(team.id)[0]
    assert (entry["action"], entry["details"]) == ("team.update", {"preemptible": False})
    assert entry["actor"] == f"{admin.name} ({admin.id})"

    assert admin.patch(f"/teams/{team.id}", json={"preemptible": True}).json()["preemptible"]
    assert team_row(sessions, team.id).preemptible is True


@pytest.mark.parametrize("value", [None, "maybe", 2, []])
def test_a_team_mark_must_be_true_or_false(admin: AdminClient, team: TeamClient, value) -> None:
    resp = admin.patch(f"/teams/{team.id}", json={"preemptible": value})
    assert resp.status_code == 400, resp.text
    # "preemptible", or "preemptible.bool" as request validation names the union's member.
    assert resp.json()["error"]["param"].split(".")[0] == "preemptible"
    assert admin.audit(team.id) == []


# --- a job's mark -------------------------------------------------------------------------


def test_an_administrator_marks_any_teams_job_and_its_owner_sees_it(
    admin: AdminClient, other_team: TeamClient, sessions
) -> None:
    job = queued_job(other_team)
    assert (job["preemptible"], job["preemptions"]) == (True, 0)

    marked = admin.patch(f"/jobs/{job['id']}", json={"preemptible": False})

    assert marked.status_code == 200, marked.text
    assert marked.json()["preemptible"] is False
    assert marked.json()["organization_id"] == other_team.id
    assert other_team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["preemptible"] is False
    with sessions() as session:
        assert session.scalar(select(Job.preemptible).where(Job.id == job["id"])) is False
    entry = admin.audit(job["id"])[0]
    assert entry["action"] == "job.update"
    assert entry["details"] == {"team": other_team.id, "preemptible": False, "was": True}
    events = other_team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any(e["message"].startswith("An administrator marked the job not") for e in events)

    again = admin.patch(f"/jobs/{job['id']}", json={"preemptible": True})
    assert again.json()["preemptible"] is True
    assert admin.audit(job["id"])[0]["details"]["was"] is False


def test_a_job_mark_is_refused_for_no_such_job_an_ended_one_and_a_bad_body(
    admin: AdminClient, team: TeamClient
) -> None:
    missing = admin.patch("/jobs/ftjob-nope", json={"preemptible": False})
    assert missing.status_code == 404
    assert (missing.json()["error"]["code"], missing.json()["error"]["param"]) == (
        "job_not_found",
        "job_id",
    )
    job = queued_job(team)
    for body in ({}, {"preemptible": None}, {"preemptible": False, "priority": "high"}):
        resp = admin.patch(f"/jobs/{job['id']}", json=body)
        assert resp.status_code == 400, (body, resp.text)
    assert team.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    ended = admin.patch(f"/jobs/{job['id']}", json={"preemptible": False})
    assert ended.status_code == 409
    assert ended.json()["error"]["code"] == "job_ended"
    assert admin.audit(job["id"]) == []


# --- out of a team's reach ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [("PATCH", "/v1/admin/teams/{team}"), ("PATCH", "/v1/admin/jobs/{job}")],
)
def test_a_team_key_cannot_set_the_marks(
    api: TestClient, team: TeamClient, sessions, method: str, url: str
) -> None:
    job = queued_job(team)
    target = url.format(team=team.id, job=job["id"])
    body = {"preemptible": False}
    as_team = api.request(method, target, headers=bearer(team.key), json=body)
    assert as_team.status_code == 403
    assert as_team.json()["error"]["code"] == "admin_key_required"
    assert api.request(method, target, json=body).status_code == 401
    assert team_row(sessions, team.id).preemptible is True
    assert team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["preemptible"] is True


def test_a_team_cannot_create_a_job_marked_not_preemptible(team: TeamClient, sessions) -> None:
    train = team.upload(CHAT).json()["id"]
    resp = team.post(
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": train, "preemptible": False},
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "preemptible"
    with sessions() as session:
        team_pk = select(Team.pk).where(Team.id == team.id).scalar_subquery()
        assert session.scalar(select(func.count()).where(Job.team_pk == team_pk)) == 0


# --- the CLI ------------------------------------------------------------------------------


def test_the_cli_sets_both_marks_audited_as_the_cli(
    admin: AdminClient, team: TeamClient, api_env, monkeypatch, sessions
) -> None:
    job = queued_job(team)
    name = team_row(sessions, team.id).name
    for variable, value in api_env.items():
        monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        by_name = CliRunner().invoke(cli, ["admin", "team-preemptible", name, "--off"])
        on_job = CliRunner().invoke(cli, ["admin", "job-preemptible", job["id"], "--off"])
        unknown = CliRunner().invoke(cli, ["admin", "team-preemptible", "no-such-team", "--on"])
        no_flag = CliRunner().invoke(cli, ["admin", "job-preemptible", job["id"]])
    finally:
        get_settings.cache_clear()

    assert by_name.exit_code == 0, by_name.output
    assert on_job.exit_code == 0, on_job.output
    assert admin.get(f"/teams/{team.id}").json()["preemptible"] is False
    assert team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["preemptible"] is False
    for target, action in ((team.id, "team.update"), (job["id"], "job.update")):
        entry = admin.audit(target)[0]
        assert (entry["actor"], entry["action"]) == ("cli", action)
        assert entry["details"]["preemptible"] is False
    assert unknown.exit_code == 1
    assert "no-such-team" in unknown.output
    assert no_flag.exit_code == 2, "--on or --off is required"
