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


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # The API and the worker are separate processes writing one file.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


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
