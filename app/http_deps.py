"""Typed FastAPI dependencies every HTTP surface needs, the API (app/api) and the dashboard
(app/web) alike: the request's database session, the settings, the object store. Who the
caller is differs (a Bearer key, a cookie), so that lives with each surface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import API_SESSIONS
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
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
