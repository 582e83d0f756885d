"""Limits enforced by counting hold under concurrent requests, on PostgreSQL and on the
embedded SQLite: a real uvicorn server, many client threads at once, never more rows than
the cap (app/services/locks.py)."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import func, select

from app.db import make_engine, make_sessionmaker
from app.domain.ids import new_id
from app.domain.jobs import WAITING_STATES
from app.migrate import upgrade
from app.models import File, Job, Team, Webhook
from app.services.webhooks import MAX_WEBHOOKS_PER_TEAM
from tests.api.datasets import CHAT
from tests.conftest import create_team_key, serve_in_thread

CLIENTS = 16
"""Requests in flight at once: enough to race, below the connection pools' limits (the
embedded server's is 15 + the threadpool's queue) so what is measured is the limit, not the
pool."""


@dataclass
class LiveServer:
    url: str
    env: dict[str, str]

    def count(self, statement) -> int:
        engine = make_engine(self.env["LATHE_DATABASE_URL"])
        try:
            with make_sessionmaker(engine)() as session:
                return session.scalar(statement)
        finally:
            engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def live(request, api_env, postgres_server, tmp_path) -> Iterator[LiveServer]:
    if request.param == "postgres":
        database_url = postgres_server.create_database("lathe_races")
    else:
        database_url = f"sqlite:///{tmp_path / 'lathe.db'}"
    upgrade(database_url)
    env = {
        **api_env,
        "LATHE_DATABASE_URL": database_url,
        "LATHE_RATE_LIMIT_PER_MINUTE": "0",
        "LATHE_DEFAULT_QUOTAS": '{"max_queued_jobs": 2}',
    }
    try:
        with serve_in_thread(env, access_log=False) as url:
            yield LiveServer(url, env)
    finally:
        if request.param == "postgres":
            postgres_server.drop_database(database_url)


def at_once(live: LiveServer, key: str, requests: int, path: str, body: dict) -> Counter:
    """POST `body` `requests` times from CLIENTS threads released together; status counts."""
    start = threading.Barrier(CLIENTS)
    headers = {"Authorization": f"Bearer {key}"}

    def client(share: int) -> list[int]:
        with httpx.Client(base_url=live.url, headers=headers, timeout=60) as http:
            start.wait()
            return [http.post(path, json=body).status_code for _ in range(share)]

    shares = [requests // CLIENTS + (i < requests % CLIENTS) for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        return Counter(code for codes in pool.map(client, shares) for code in codes)


def test_concurrent_webhook_creations_never_pass_the_cap(live: LiveServer) -> None:
    team_id, key = create_team_key(live.env)
    codes = at_once(live, key, 300, "/v1/webhooks", {"url": "https://198.51.100.7/h"})
    assert codes == {200: MAX_WEBHOOKS_PER_TEAM, 400: 300 - MAX_WEBHOOKS_PER_TEAM}, codes
    stored = live.count(
        select(func.count())
        .select_from(Webhook)
        .join(Team, Team.pk == Webhook.team_pk)
        .where(Team.id == team_id)
    )
    assert stored == MAX_WEBHOOKS_PER_TEAM


def test_concurrent_job_creations_never_pass_max_queued_jobs(live: LiveServer) -> None:
    team_id, key = create_team_key(live.env)
    # The dataset's row as an upload leaves it (creating a job reads only the row).
    engine = make_engine(live.env["LATHE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        training = File(
            id=new_id("file"),
            team_pk=session.scalar(select(Team.pk).where(Team.id == team_id)),
            filename="train.jsonl",
            purpose="fine-tune",
            bytes=len(CHAT),
            sha256=hashlib.sha256(CHAT).hexdigest(),
            storage_key="files/unused",
            format="chat",
            examples=CHAT.count(b"\n"),
        )
        session.add(training)
        session.commit()
    engine.dispose()
    body = {"model": "tiny-random-llama", "training_file": training.id}
    codes = at_once(live, key, 30, "/v1/fine_tuning/jobs", body)
    assert codes == {200: 2, 429: 28}, codes
    waiting = live.count(
        select(func.count())
        .select_from(Job)
        .join(Team, Team.pk == Job.team_pk)
        .where(Team.id == team_id, Job.status.in_([s.value for s in WAITING_STATES]))
    )
    assert waiting == 2
