"""The API in-process (TestClient) on real Postgres, Redis and S3; no worker consumes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.main import create_app
from app.models import Worker
from tests.conftest import create_team_key, settings_from


@pytest.fixture(scope="session")
def api_env(stack_env: dict[str, str], postgres_server) -> Iterator[dict[str, str]]:
    """The stack with a database and Redis db of its own, and no scheduler thread: the
    jobs these tests queue stay queued (the e2e tests' workers never see them), and
    tests that need a pass run `schedule_once` themselves."""
    from app.migrate import upgrade

    url = postgres_server.create_database("lathe_api")
    upgrade(url)
    yield {
        **stack_env,
        "LATHE_DATABASE_URL": url,
        "LATHE_BROKER_URL": stack_env["LATHE_BROKER_URL"][:-1] + "1",
        "LATHE_SCHEDULER_IN_API": "false",
        "LATHE_GPU_CLASSES": '{"cpu": 8}',  # a declared class, so jobs are accepted
    }
    postgres_server.drop_database(url)


@pytest.fixture(scope="session")
def api(api_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_from(api_env))) as client:
        yield client


@dataclass
class TeamClient:
    id: str
    key: str
    client: TestClient

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **(extra or {})}

    def get(self, url: str, headers: dict[str, str] | None = None, **kw) -> httpx.Response:
        return self.client.get(url, headers=self._headers(headers), **kw)

    def post(self, url: str, headers: dict[str, str] | None = None, **kw) -> httpx.Response:
        return self.client.post(url, headers=self._headers(headers), **kw)

    def delete(self, url: str, headers: dict[str, str] | None = None, **kw) -> httpx.Response:
        return self.client.delete(url, headers=self._headers(headers), **kw)

    def upload(self, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
        return self.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose})


@pytest.fixture
def sessions(api_env: dict[str, str]) -> Iterator[sessionmaker[Session]]:
    """Sessions on the API's database, for setting up and checking rows directly."""
    engine = make_engine(api_env["LATHE_DATABASE_URL"])
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def team(api: TestClient, api_env: dict[str, str]) -> TeamClient:
    return TeamClient(*create_team_key(api_env), api)


@pytest.fixture
def other_team(api: TestClient, api_env: dict[str, str]) -> TeamClient:
    return TeamClient(*create_team_key(api_env, "other"), api)


@pytest.fixture
def worker_id(sessions) -> Iterator[str]:
    """A live worker row of the api tests' declared class ("cpu"), removed afterwards so
    it leaves the pool for the tests that follow."""
    wid = f"w-{uuid.uuid4().hex[:6]}@host"
    with sessions() as session:
        session.add(
            Worker(
                id=wid,
                host="host",
                gpu_name="cpu",
                gpu_class="cpu",
                memory_gb=8,
                status="active",
                jobs_done=0,
                last_seen=time.time(),
            )
        )
        session.commit()
    yield wid
    with sessions() as session:
        session.execute(delete(Worker).where(Worker.id == wid))
        session.commit()
