"""Typed FastAPI dependencies: the database session, the caller's team, the object store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import API_SESSIONS
from app.errors import Forbidden, Unauthorized
from app.logs import bind
from app.models import AdminKey, Team
from app.services.admin import admin_for_key
from app.services.idempotency import KEY_PATTERN
from app.services.teams import bearer_key, team_for_key
from app.storage import ObjectStore


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session, from its first dependency to the end of its handler.

    Made on the event loop (no connection yet, so no thread); authentication ends its own
    transaction, so the connection goes back to the pool before the handler's turn for a
    thread. At most API_SESSIONS requests hold one at once (SessionDep): the pool keeps a
    connection for each, plus a reserve (app/db.py), so no thread waits for a connection
    held by a request that is itself waiting for a thread."""
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        if session.in_transaction():
            # A handler that only read leaves its transaction open: the rollback is a round
            # trip, on a thread of its own (not the request pool, which may be busy).
            await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()  # nothing to end: no I/O


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


# scope="function": closed when the handler returns, before a (streamed) body is sent.
# max_concurrency: the other requests wait on the event loop, holding no thread.
SessionDep = Annotated[
    Session, Depends(get_session, scope="function", max_concurrency=API_SESSIONS)
]
# Retries of a POST with the same key return the first result (app.services.idempotency).
# The pattern is documented here and checked there (400 invalid_idempotency_key).
IdempotencyKeyDep = Annotated[
    str | None,
    Header(alias="Idempotency-Key", json_schema_extra={"pattern": KEY_PATTERN.pattern}),
]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]


# The schemes put the keys in the OpenAPI document (and the docs' Authorize button); they
# never refuse a request themselves: current_team and current_admin read and check the key.
TeamBearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(
        HTTPBearer(
            scheme_name="TeamKey",
            description="A team's API key: `Authorization: Bearer <key>`",
            auto_error=False,
        )
    ),
]
AdminBearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(
        HTTPBearer(
            scheme_name="AdminKey",
            description="An admin key (`lathe admin create-admin-key NAME`)",
            auto_error=False,
        )
    ),
]


def current_team(request: Request, session: SessionDep, _bearer: TeamBearer) -> Team:
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise Unauthorized(
            "missing or malformed API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    team = team_for_key(session, key)
    if team is None:
        raise Unauthorized("invalid or revoked API key", code="invalid_api_key")
    bind(team_id=team.id)  # on this request's log lines from here on (app/logs.py)
    if team.disabled:
        raise Forbidden(f"team {team.name} is disabled; ask an administrator", code="team_disabled")
    session.commit()  # the lookup's transaction ends here: its connection goes back at once
    return team


TeamDep = Annotated[Team, Depends(current_team)]


def current_admin(request: Request, session: SessionDep, _bearer: AdminBearer) -> AdminKey:
    """The caller's admin key; a team key is refused (403), a missing or unknown one 401."""
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise Unauthorized(
            "missing or malformed admin key: send 'Authorization: Bearer <admin key>'",
            code="missing_api_key",
        )
    admin = admin_for_key(session, key)
    if admin is not None:
        session.commit()  # as in current_team: the connection goes back at once
        return admin
    if team_for_key(session, key) is not None:
        raise Forbidden(
            "this is a team API key; the admin API needs an admin key "
            "(lathe admin create-admin-key NAME)",
            code="admin_key_required",
        )
    raise Unauthorized("invalid or revoked admin key", code="invalid_api_key")


AdminDep = Annotated[AdminKey, Depends(current_admin)]
