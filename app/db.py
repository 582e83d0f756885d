"""Database engine and sessions, shared by the API and the worker (no FastAPI here)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")


# The API process's connection budget (app/main.py, app/api/deps.py). A request holds its
# session from its first dependency to the end of its handler, and a session uses at most
# one connection at a time; at most API_SESSIONS requests hold one at once, the others wait
# on the event loop, taking no thread. The reserve is for what queries outside a request's
# session: the event-stream poller (app/api/event_stream.py), /readyz and /metrics; each
# uses one connection for one short query on a thread of its own and gives it back.
#
# So when every session holds a connection and is waiting for a thread, connections are
# still left over for the threads, and a thread that waits for one waits on a query that
# is running, never on a request that is waiting for a thread (the 30 s stall, issue 11).
API_SESSIONS = 32
API_RESERVED_CONNECTIONS = 8
API_CONNECTIONS = API_SESSIONS + API_RESERVED_CONNECTIONS
# Worker threads for the API's blocking work (sync routes and dependencies, response
# checks): anyio's default, stated, and one per connection.
API_THREADS = API_CONNECTIONS


def make_engine(url: str, *, max_connections: int | None = None) -> Engine:
    """An engine whose pool lends at most `max_connections` (the API's API_CONNECTIONS);
    unset, SQLAlchemy's defaults (5 + 10 on SQLite, 10 + 20 on Postgres), for the worker
    and the command line."""
    if max_connections is None:
        sizing = {} if url.startswith("sqlite") else {"pool_size": 10, "max_overflow": 20}
    else:
        # All kept once opened: an overflow connection is closed on return, and under load
        # the API would open and close one (a Postgres backend fork) at every request.
        sizing = {"pool_size": max_connections, "max_overflow": 0}
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, **sizing
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # The API and the worker are separate processes writing one file.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **sizing)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


RETRYABLE = (OperationalError, InterfaceError)


def retry_db(fn: Callable[..., T], deadline_s: float = 120.0) -> Callable[..., T]:
    """Re-run `fn` (a whole transaction) while the database is unreachable, backing off
    up to 5 s between tries, for at most `deadline_s`. Workers wrap their writes in it so
    a Postgres restart pauses a training job's bookkeeping instead of failing the job."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> T:
        delay, deadline = 0.5, time.monotonic() + deadline_s
        while True:
            try:
                return fn(*args, **kwargs)
            except RETRYABLE as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "database unavailable (%s); retrying in %.1f s", exc.__class__.__name__, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    return wrapper
