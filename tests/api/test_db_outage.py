"""Postgres stopped under a running API: requests answer 503 (never 500) while it is away,
and the API serves again by itself once it is back."""

from __future__ import annotations

from fastapi.testclient import TestClient
from pytest_postgresql import factories

from app.main import create_app
from app.migrate import upgrade
from tests.conftest import PG_CTL, PostgresServer, create_team_key, settings_from, wait_for

# A server of this module's own: stopping it disturbs no other test.
outage_postgresql_proc = factories.postgresql_proc(
    executable=str(PG_CTL), host="127.0.0.1", port=None, user="postgres"
)


def test_503_while_postgres_is_down_then_recovery(outage_postgresql_proc, api_env) -> None:
    proc = outage_postgresql_proc
    server = PostgresServer(host=proc.host, port=proc.port, user=proc.user)
    url = server.create_database("lathe_outage")
    upgrade(url)
    env = {**api_env, "LATHE_DATABASE_URL": url}
    _, key = create_team_key(env, "outage")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings_from(env))) as client:
        assert client.get("/v1/files", headers=headers).status_code == 200
        proc.stop()
        try:
            down = client.get("/v1/files", headers=headers)
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "database_unavailable"
            assert client.get("/readyz").status_code == 503
        finally:
            proc.start()
        wait_for(
            lambda: client.get("/v1/files", headers=headers).status_code == 200,
            30,
            what="the API to serve again",
        )
