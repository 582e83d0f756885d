"""/v1/admin on Postgres: admin keys, teams, quotas, keys, workers, jobs and the audit log."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import app as cli
from app.config import get_settings
from app.models import Worker
from app.services.admin_keys import create_admin_key
from tests.api.conftest import TeamClient
from tests.api.datasets import CHAT

MODEL = "tiny-random-llama"


@dataclass
class AdminClient:
    id: str
    name: str
    key: str
    client: TestClient

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, url: str, **kw) -> httpx.Response:
        return self.client.get("/v1/admin" + url, headers=self._headers(), **kw)

    def post(self, url: str, **kw) -> httpx.Response:
        return self.client.post("/v1/admin" + url, headers=self._headers(), **kw)

    def patch(self, url: str, **kw) -> httpx.Response:
        return self.client.patch("/v1/admin" + url, headers=self._headers(), **kw)

    def delete(self, url: str, **kw) -> httpx.Response:
        return self.client.delete("/v1/admin" + url, headers=self._headers(), **kw)

    def audit(self, target: str) -> list[dict]:
        """This target's audit entries, newest first."""
        entries = self.get("/audit", params={"limit": 100}).json()["data"]
        return [e for e in entries if e["target"] == target]


@pytest.fixture
def admin(api: TestClient, sessions) -> AdminClient:
    name = f"ops-{uuid.uuid4().hex[:6]}"
    with sessions() as session:
        record, key = create_admin_key(session, name)
    return AdminClient(record.id, name, key, api)


def new_team(admin: AdminClient, **body) -> dict:
    resp = admin.post("/teams", json={"name": f"t-{uuid.uuid4().hex[:8]}", **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- who may call -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/v1/admin/teams"),
        ("POST", "/v1/admin/teams"),
        ("PATCH", "/v1/admin/teams/team-x"),
        ("DELETE", "/v1/admin/keys/key-x"),
        ("POST", "/v1/admin/workers/w1@host/drain"),
        ("POST", "/v1/admin/jobs/ftjob-x/cancel"),
        ("GET", "/v1/admin/audit"),
    ],
)
def test_team_keys_get_403_and_no_key_401(api, team, method, url) -> None:
    as_team = api.request(method, url, headers=bearer(team.key), json={})
    assert as_team.status_code == 403
    assert as_team.json()["error"]["code"] == "admin_key_required"
    anonymous = api.request(method, url, json={})
    assert anonymous.status_code == 401
    unknown = api.request(method, url, headers=bearer("lathe-admin-nope"), json={})
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "invalid_api_key"


def test_admin_keys_do_not_open_team_routes(api, admin) -> None:
    assert api.get("/v1/files", headers=bearer(admin.key)).status_code == 401


# --- teams --------------------------------------------------------------------------------


def test_created_team_gets_a_working_key_and_settings(api, admin) -> None:
    team = new_team(admin, weight=2.5, quotas={"max_queued_jobs": 3})
    assert team["object"] == "team"
    assert team["key"].startswith("lathe-")
    assert (team["weight"], team["disabled"]) == (2.5, False)
    assert team["quotas"] == {
        "max_running_jobs": None,
        "max_queued_jobs": 3,
        "max_file_bytes": None,
        "gpu_hours_per_month": None,
    }
    assert api.get("/v1/files", headers=bearer(team["key"])).status_code == 200
    got = admin.get(f"/teams/{team['id']}").json()
    assert "key" not in got
    assert got == {k: v for k, v in team.items() if k != "key"}
    listed = admin.get("/teams", params={"limit": 100}).json()
    assert listed["object"] == "list"
    assert team["id"] in [t["id"] for t in listed["data"]]
    [entry] = admin.audit(team["id"])
    assert entry["action"] == "team.create"
    assert entry["details"]["weight"] == 2.5
    assert team["key"] not in str(entry)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "Has Spaces"},
        {"name": "ok", "weight": 0},
        {"name": "ok", "quotas": {"max_queued_jobs": -1}},
        {"name": "ok", "quotas": {"max_jobs": 1}},
        {"name": "ok", "colour": "red"},
    ],
)
def test_bad_team_bodies_are_refused(admin, body) -> None:
    resp = admin.post("/teams", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_value"


def test_a_team_name_is_taken_once(admin) -> None:
    team = new_team(admin)
    again = admin.post("/teams", json={"name": team["name"]})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "team_exists"


def test_unknown_team_is_404(admin) -> None:
    assert admin.get("/teams/team-nope").status_code == 404
    assert admin.patch("/teams/team-nope", json={"weight": 2}).status_code == 404


def test_disabled_team_is_refused_until_enabled(admin, team) -> None:
    resp = admin.patch(f"/teams/{team.id}", json={"disabled": True})
    assert resp.json()["disabled"] is True
    refused = team.get("/v1/files")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "team_disabled"
    admin.patch(f"/teams/{team.id}", json={"disabled": False})
    assert team.get("/v1/files").status_code == 200
    assert [e["details"] for e in admin.audit(team.id)] == [
        {"disabled": False},
        {"disabled": True},
    ]


def test_weight_and_quotas_are_set_read_back_and_cleared(admin, team) -> None:
    quotas = {
        "max_running_jobs": 2,
        "max_queued_jobs": 5,
        "max_file_bytes": 1_000_000,
        "gpu_hours_per_month": 12.5,
    }
    resp = admin.patch(f"/teams/{team.id}", json={"weight": 3, "quotas": quotas})
    assert resp.status_code == 200, resp.text
    got = admin.get(f"/teams/{team.id}").json()
    assert (got["weight"], got["quotas"]) == (3.0, quotas)
    # Absent fields are kept; a quota sent as null goes back to the deployment default.
    admin.patch(f"/teams/{team.id}", json={"quotas": {"max_file_bytes": None}})
    got = admin.get(f"/teams/{team.id}").json()
    assert got["weight"] == 3.0
    assert got["quotas"] == {**quotas, "max_file_bytes": None}
    [cleared, first] = admin.audit(team.id)
    assert first["action"] == cleared["action"] == "team.update"
    assert first["details"] == {"weight": 3, **quotas}
    assert cleared["details"] == {"max_file_bytes": None}


@pytest.mark.parametrize("body", [{"weight": 0}, {"weight": None}, {"disabled": None}])
def test_bad_team_updates_are_refused(admin, team, body) -> None:
    resp = admin.patch(f"/teams/{team.id}", json=body)
    assert resp.status_code == 400, resp.text
    assert admin.get(f"/teams/{team.id}").json()["weight"] == 1.0


OUT_OF_BOUNDS = [
    ("gpu_hours_per_month", "Infinity"),  # was stored, and shown as null
    ("gpu_hours_per_month", "NaN"),
    ("gpu_hours_per_month", "1e26"),
    ("max_file_bytes", "1e26"),  # was a 500
    ("max_file_bytes", str(2**63)),  # past the BigInteger column
    ("max_running_jobs", str(2**31)),  # past the Integer column
    ("max_queued_jobs", "-1"),
]


@pytest.mark.parametrize(("field", "raw"), OUT_OF_BOUNDS)
def test_quotas_out_of_bounds_are_refused_naming_the_field(admin, team, field, raw) -> None:
    # Raw JSON: Infinity and NaN are what Python's json (and so Starlette) parses.
    body = f'{{"quotas": {{"{field}": {raw}}}}}'
    headers = {**admin._headers(), "Content-Type": "application/json"}
    before = admin.get(f"/teams/{team.id}").json()
    for method, url in (("patch", f"/teams/{team.id}"), ("post", "/teams")):
        content = (
            body if method == "patch" else body[:-1] + f', "name": "q-{uuid.uuid4().hex[:8]}"}}'
        )
        resp = admin.client.request(
            method.upper(), "/v1/admin" + url, content=content, headers=headers
        )
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_value"
        assert error["param"] == f"quotas.{field}"
    assert admin.get(f"/teams/{team.id}").json() == before


def test_quota_and_weight_bounds_are_in_the_document(api) -> None:
    schemas = api.app.openapi()["components"]["schemas"]
    quotas = schemas["QuotasIn"]["properties"]
    bounds = {name: quotas[name]["anyOf"][0] for name in quotas}
    assert bounds["max_file_bytes"] == {"type": "integer", "minimum": 0, "maximum": 2**50}
    assert bounds["gpu_hours_per_month"]["maximum"] == 10_000_000
    assert schemas["TeamCreate"]["properties"]["weight"]["maximum"] == 1_000_000


def test_the_service_refuses_the_same_bounds(sessions, team) -> None:
    """The check behind the schema (app.services.team_admin), for callers that skip it."""
    from app.errors import BadRequest
    from app.services import team_admin as service

    with sessions() as session:
        caller, _ = create_admin_key(session, f"bounds-{uuid.uuid4().hex[:6]}")
        for fields in (
            {"gpu_hours_per_month": float("inf")},
            {"max_file_bytes": 10**26},
            {"max_queued_jobs": 2.5},
            {"weight": float("inf")},
            {"weight": float("nan")},
        ):
            with pytest.raises(BadRequest) as info:
                service.update_team(session, caller, team.id, fields)
            assert info.value.param == next(iter(fields))


def test_max_queued_jobs_refuses_the_next_job_with_429(admin, team) -> None:
    train_id = team.upload(CHAT).json()["id"]
    admin.patch(f"/teams/{team.id}", json={"quotas": {"max_queued_jobs": 1}})
    body = {"model": MODEL, "training_file": train_id}
    first = team.post("/v1/fine_tuning/jobs", json=body)
    assert first.status_code == 200, first.text
    second = team.post("/v1/fine_tuning/jobs", json=body)
    assert second.status_code == 429, second.text
    error = second.json()["error"]
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_queued_jobs")
    assert "max_queued_jobs" in error["message"]
    assert "limit 1" in error["message"]
    assert len(team.get("/v1/fine_tuning/jobs").json()["data"]) == 1


# --- keys ---------------------------------------------------------------------------------


def test_rotation_revokes_the_old_keys_and_returns_a_new_one(api, admin, team) -> None:
    extra = admin.post(f"/teams/{team.id}/keys").json()
    assert extra["object"] == "api_key"
    assert api.get("/v1/files", headers=bearer(extra["key"])).status_code == 200
    rotated = admin.post(f"/teams/{team.id}/keys/rotate")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()
    assert team.get("/v1/files").status_code == 401
    assert api.get("/v1/files", headers=bearer(extra["key"])).status_code == 401
    assert api.get("/v1/files", headers=bearer(new["key"])).status_code == 200
    keys = admin.get(f"/teams/{team.id}/keys").json()["data"]
    assert len(keys) == 3
    assert all(set(k) == {"id", "object", "prefix", "created_at", "revoked_at"} for k in keys)
    assert [k["id"] for k in keys if k["revoked_at"] is None] == [new["id"]]
    assert new["key"].startswith(new["prefix"])
    [rotation] = admin.audit(team.id)
    assert rotation["action"] == "keys.rotate"
    assert rotation["details"]["key_id"] == new["id"]
    assert extra["id"] in rotation["details"]["revoked"]
    assert new["key"] not in str(rotation)


def test_a_revoked_key_stops_working(admin, team) -> None:
    [key] = admin.get(f"/teams/{team.id}/keys").json()["data"]
    resp = admin.delete(f"/keys/{key['id']}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["revoked_at"] is not None
    assert "key" not in resp.json()
    assert team.get("/v1/files").status_code == 401
    assert admin.delete(f"/keys/{key['id']}").status_code == 409
    assert admin.delete("/keys/key-nope").status_code == 404
    [entry] = admin.audit(key["id"])
    assert (entry["action"], entry["details"]["team"]) == ("key.revoke", team.id)


# --- workers ------------------------------------------------------------------------------


def test_drain_and_undrain_a_worker(admin, worker_id, sessions) -> None:
    drained = admin.post(f"/workers/{worker_id}/drain")
    assert drained.status_code == 200, drained.text
    assert (drained.json()["id"], drained.json()["status"]) == (worker_id, "draining")
    # Draining again is no change; the encoded form of the id names the same worker.
    encoded = worker_id.replace("@", "%40")
    assert admin.post(f"/workers/{encoded}/drain").json()["status"] == "draining"
    assert admin.post(f"/workers/{worker_id}/undrain").json()["status"] == "active"
    assert [(e["action"], e["details"]) for e in admin.audit(worker_id)] == [
        ("worker.undrain", {"from": "draining", "to": "active"}),
        ("worker.drain", {"from": "active", "to": "draining"}),
    ]
    with sessions() as session:
        session.query(Worker).filter(Worker.id == worker_id).update({"status": "lost"})
        session.commit()
    lost = admin.post(f"/workers/{worker_id}/drain")
    assert lost.status_code == 409
    assert lost.json()["error"]["code"] == "worker_not_live"
    assert lost.json()["error"]["message"] == (
        f"worker {worker_id} is lost; only a live worker can be drained"
    )
    not_undrained = admin.post(f"/workers/{worker_id}/undrain")
    assert not_undrained.status_code == 409
    assert not_undrained.json()["error"]["message"].endswith("only a live worker can be undrained")
    assert admin.post("/workers/nobody@nowhere/drain").status_code == 404


# --- jobs ---------------------------------------------------------------------------------


def test_admin_cancels_another_teams_queued_job(admin, other_team: TeamClient) -> None:
    train_id = other_team.upload(CHAT).json()["id"]
    job = other_team.post(
        "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": train_id}
    ).json()
    assert job["status"] == "queued"
    resp = admin.post(f"/jobs/{job['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"
    assert resp.json()["organization_id"] == other_team.id
    seen = other_team.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert seen["status"] == "cancelled"
    assert seen["finished_at"] is not None
    events = other_team.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"] == "Fine-tuning job cancelled by an administrator"
    again = admin.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_cancellable"
    assert admin.post("/jobs/ftjob-nope/cancel").status_code == 404
    [entry] = admin.audit(job["id"])
    assert entry["action"] == "job.cancel"
    assert entry["details"] == {"team": other_team.id, "from": "queued"}


# --- the audit log ------------------------------------------------------------------------


def test_audit_log_names_actor_and_action_newest_first(admin, team, worker_id) -> None:
    created = new_team(admin)
    admin.patch(f"/teams/{team.id}", json={"weight": 2})
    key = admin.post(f"/teams/{team.id}/keys").json()
    admin.delete(f"/keys/{key['id']}")
    admin.post(f"/teams/{team.id}/keys/rotate")
    admin.post(f"/workers/{worker_id}/drain")
    admin.post(f"/workers/{worker_id}/undrain")
    page = admin.get("/audit", params={"limit": 7}).json()
    assert page["object"] == "list"
    assert [(e["action"], e["target"]) for e in page["data"]] == [
        ("worker.undrain", worker_id),
        ("worker.drain", worker_id),
        ("keys.rotate", team.id),
        ("key.revoke", key["id"]),
        ("key.issue", key["id"]),
        ("team.update", team.id),
        ("team.create", created["id"]),
    ]
    assert all(e["actor"] == f"{admin.name} ({admin.id})" for e in page["data"])
    assert all(e["object"] == "audit_entry" for e in page["data"])
    older = admin.get("/audit", params={"limit": 1, "after": page["data"][1]["id"]}).json()
    assert [e["action"] for e in older["data"]] == ["keys.rotate"]
    assert admin.get("/audit", params={"after": "audit-nope"}).status_code == 400


def test_cli_creates_an_admin_key(api, api_env, monkeypatch) -> None:
    for name, value in api_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["admin", "create-admin-key", "ops-cli"])
        blank = CliRunner().invoke(cli, ["admin", "create-admin-key", " "])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("lathe-admin-")
    resp = api.get("/v1/admin/audit", headers=bearer(key), params={"limit": 100})
    assert resp.status_code == 200
    entry = next(e for e in resp.json()["data"] if e["action"] == "admin_key.create")
    assert entry["actor"] == "cli"
    assert entry["details"]["name"] == "ops-cli"
    assert key not in str(resp.json())
    assert blank.exit_code == 2
