"""`lathe admin create-team` and /readyz's failure answer."""

from __future__ import annotations

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import app as cli
from app.config import get_settings
from app.main import create_app
from tests.conftest import settings_from


def test_create_team_prints_a_working_key_last(api, api_env, monkeypatch) -> None:
    for name, value in api_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["admin", "create-team", "cli-made"])
        again = CliRunner().invoke(cli, ["admin", "create-team", "cli-made"])
        bad = CliRunner().invoke(cli, ["admin", "create-team", "Has Spaces"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("lathe-")
    assert api.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert again.exit_code == 1
    assert bad.exit_code == 2


def test_readyz_names_the_unreachable_dependency(api_env) -> None:
    broken = settings_from({**api_env, "LATHE_STORAGE_URL": "s3://no-such-bucket/x"})
    with TestClient(create_app(broken)) as client:
        resp = client.get("/readyz")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["storage"].startswith("error")


def test_an_unreachable_database_is_a_503_to_retry(api_env) -> None:
    gone = settings_from(
        {**api_env, "LATHE_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/lathe"}
    )
    with TestClient(create_app(gone)) as client:
        resp = client.get("/v1/files", headers={"Authorization": "Bearer lathe-anything"})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "2"
    assert resp.json()["error"]["code"] == "database_unavailable"
