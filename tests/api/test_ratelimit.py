"""Rate limits, counted in the deployment's Redis: per API key, whatever the spelling of
the header, and per client address for requests without a valid key.

Each test fixes the limiter's clock at a minute window of its own (so a burst never
straddles two windows, and counts in the shared Redis never meet another test's) and
comes from a client address of its own.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from app import ratelimit
from app.main import create_app
from app.models import ApiKey, Team
from app.services.teams import bearer_key
from tests.conftest import create_team_key, settings_from

LIMIT = 3
_windows = itertools.count(int(uuid.uuid4().int % 10**6) * 1000)
_addresses = itertools.count(1)


@pytest.fixture
def limited(api_env, monkeypatch) -> Iterator[TestClient]:
    """The app with a limit of LIMIT requests a minute, at the start of a window of its
    own; a client from an address of its own."""
    window = next(_windows)
    monkeypatch.setattr(ratelimit, "clock", lambda: window * ratelimit.WINDOW_SECONDS + 1.0)
    settings = settings_from({**api_env, "LATHE_RATE_LIMIT_PER_MINUTE": str(LIMIT)})
    with TestClient(create_app(settings), client=address()) as client:
        yield client


def address() -> tuple[str, int]:
    n = next(_addresses)
    return f"198.51.{n // 250}.{n % 250 + 1}", 40000


def from_elsewhere(client: TestClient) -> TestClient:
    """Another client address on the same app (its lifespan already runs)."""
    other = TestClient(client.app, client=address())
    other.portal = client.portal  # one event loop: the limiter's Redis client lives in it
    return other


def test_a_key_over_its_limit_gets_429_and_others_do_not(limited, api_env) -> None:
    _, key = create_team_key(api_env, "limited")
    _, other = create_team_key(api_env, "unlimited")
    mine = [limited.get("/v1/files", headers={"Authorization": f"Bearer {key}"}) for _ in range(4)]
    theirs = limited.get("/v1/files", headers={"Authorization": f"Bearer {other}"})
    health = [limited.get("/healthz") for _ in range(5)]
    assert [r.status_code for r in mine] == [200, 200, 200, 429]
    assert mine[0].headers["x-ratelimit-remaining"] == "2"
    error = mine[3].json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert 1 <= int(mine[3].headers["retry-after"]) <= 61
    assert theirs.status_code == 200
    assert all(r.status_code == 200 for r in health)


def test_every_spelling_of_a_key_is_one_key_to_auth_and_the_limiter(limited, api_env) -> None:
    _, key = create_team_key(api_env)
    spellings = [f"Bearer {key}", f"bEaReR {key}", f"Bearer   {key}", f"Bearer\t{key}"]
    answers = [limited.get("/v1/files", headers={"Authorization": h}) for h in spellings]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert (
        limited.get("/v1/files", headers={"Authorization": f"BEARER \t {key}"}).status_code == 429
    )


def test_requests_without_a_key_are_limited_per_client_address(limited) -> None:
    answers = [limited.get("/v1/files") for _ in range(LIMIT + 1)]
    assert [r.status_code for r in answers] == [401] * LIMIT + [429]
    assert "without a valid API key" in answers[-1].json()["error"]["message"]
    # Not an API key at all (another scheme, a malformed one) counts as none.
    assert limited.get("/v1/files", headers={"Authorization": "Basic abc"}).status_code == 429
    assert from_elsewhere(limited).get("/v1/files").status_code == 401


def test_made_up_keys_count_against_the_address_and_stop_reaching_the_database(
    limited, api_env
) -> None:
    _, good = create_team_key(api_env)
    _, unseen = create_team_key(api_env)
    assert limited.get("/v1/files", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    made_up = [
        limited.get("/v1/files", headers={"Authorization": f"Bearer lathe-{uuid.uuid4().hex}"})
        for _ in range(LIMIT)
    ]
    assert [r.status_code for r in made_up] == [401] * LIMIT
    queries: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        queries.append(statement)

    engine = limited.app.state.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        refused = limited.get(
            "/v1/files", headers={"Authorization": f"Bearer lathe-{uuid.uuid4().hex}"}
        )
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert refused.status_code == 429
    assert queries == []  # refused before the key lookup
    # A key this API knows to be good still works from the address; an unproven one waits.
    assert limited.get("/v1/files", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    assert (
        limited.get("/v1/files", headers={"Authorization": f"Bearer {unseen}"}).status_code == 429
    )
    # Other addresses are not affected.
    elsewhere = from_elsewhere(limited)
    assert (
        elsewhere.get("/v1/files", headers={"Authorization": f"Bearer {unseen}"}).status_code == 200
    )


def test_a_revoked_key_is_no_longer_known_good(limited, api_env, sessions) -> None:
    team_id, key = create_team_key(api_env)
    headers = {"Authorization": f"Bearer {key}"}
    assert limited.get("/v1/files", headers=headers).status_code == 200  # known good now
    with sessions() as session:
        pk = session.scalar(select(Team.pk).where(Team.id == team_id))
        session.execute(update(ApiKey).where(ApiKey.team_pk == pk).values(revoked_at=1.0))
        session.commit()
    assert limited.get("/v1/files", headers=headers).status_code == 401
    assert [limited.get("/v1/files").status_code for _ in range(2)] == [401, 401]
    # The address is at its limit; the key's own count (3) is not, but it is no longer
    # vouched for: refused before its lookup.
    assert limited.get("/v1/files", headers=headers).status_code == 429


def test_the_in_process_counter_keeps_the_same_rules(monkeypatch) -> None:
    """The embedded default (no Redis): the same buckets, counted in memory."""
    monkeypatch.setattr(ratelimit, "clock", lambda: 1000 * ratelimit.WINDOW_SECONDS + 1.0)

    async def app(scope, receive, send) -> None:  # "good" is the one valid key
        header = dict(scope["headers"]).get(b"authorization", b"").decode()
        status = 200 if bearer_key(header) == "good" else 401
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limiter = ratelimit.RateLimitMiddleware(app, per_minute=2, broker_url=None)
    assert isinstance(limiter.counter, ratelimit.MemoryCounter)

    def get(authorization: str | None, host: str = "192.0.2.1") -> int:
        headers = [(b"authorization", authorization.encode())] if authorization else []
        scope = {"type": "http", "path": "/v1/files", "headers": headers, "client": (host, 1)}
        sent: list[dict] = []

        async def send(message) -> None:
            sent.append(message)

        anyio.run(limiter, scope, None, send)
        return sent[0]["status"]

    assert [get("Bearer good"), get("bearer  good"), get("Bearer\tgood")] == [200, 200, 429]
    assert [get("Bearer bad1"), get(None), get("Bearer bad2")] == [401, 401, 429]
    assert get(None, host="192.0.2.2") == 401
