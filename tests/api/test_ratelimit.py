"""Per-key rate limits, counted in the deployment's Redis."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import create_team_key, settings_from


def test_a_key_over_its_limit_gets_429_and_others_do_not(api_env) -> None:
    settings = settings_from({**api_env, "LATHE_RATE_LIMIT_PER_MINUTE": "3"})
    _, key = create_team_key(api_env, "limited")
    _, other = create_team_key(api_env, "unlimited")
    with TestClient(create_app(settings)) as client:
        if time.time() % 60 > 57:  # keep the burst inside one minute window
            time.sleep(60.5 - time.time() % 60)
        mine = [
            client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}) for _ in range(4)
        ]
        theirs = client.get("/v1/files", headers={"Authorization": f"Bearer {other}"})
        health = [client.get("/healthz") for _ in range(5)]
    assert [r.status_code for r in mine] == [200, 200, 200, 429]
    assert mine[0].headers["x-ratelimit-remaining"] == "2"
    error = mine[3].json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(mine[3].headers["retry-after"]) <= 61
    assert theirs.status_code == 200
    assert all(r.status_code == 200 for r in health)
