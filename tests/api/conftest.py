"""The API in-process (TestClient) on real Postgres, Redis and S3; no worker consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import create_team_key, settings_from


@pytest.fixture(scope="session")
def api_env(stack_env: dict[str, str]) -> dict[str, str]:
    # Redis database 1: tasks sent here are never taken by the e2e tests' worker.
    return {**stack_env, "LATHE_BROKER_URL": stack_env["LATHE_BROKER_URL"][:-1] + "1"}


@pytest.fixture(scope="session")
def api(api_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(api_env))) as client:
        yield client


@dataclass
class TeamClient:
    id: str
    key: str
    client: TestClient

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, url: str, **kw) -> httpx.Response:
        return self.client.get(url, headers=self._headers(), **kw)

    def post(self, url: str, **kw) -> httpx.Response:
        return self.client.post(url, headers=self._headers(), **kw)

    def delete(self, url: str, **kw) -> httpx.Response:
        return self.client.delete(url, headers=self._headers(), **kw)

    def upload(self, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
        return self.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


@pytest.fixture
def team(api: TestClient, api_env: dict[str, str]) -> TeamClient:
    return TeamClient(*create_team_key(api_env), api)


@pytest.fixture
def other_team(api: TestClient, api_env: dict[str, str]) -> TeamClient:
    return TeamClient(*create_team_key(api_env, "other"), api)
