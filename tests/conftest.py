"""Session fixtures for the real backing services: PostgreSQL, Redis and S3.

Each service is a throwaway server started for the test session on a free port, unless
an environment variable points the tests at one that already runs:

- ``LATHE_TEST_DATABASE_URL``: a SQLAlchemy URL (``postgresql+psycopg://...``). ``postgres_url``
  returns it as given; ``fresh_postgres_url`` creates (and drops) databases on that server,
  so its user needs CREATEDB.
- ``LATHE_TEST_REDIS_URL``: ``redis://host:port/db``.
- ``LATHE_TEST_S3_ENDPOINT_URL``: an S3-compatible endpoint (AWS credentials from the
  environment are kept; fake ones are set only where none are).

PostgreSQL is started by pytest-postgresql from the machine's binaries through
``tests/bin/pg_ctl``, which finds pg_ctl (Debian keeps it in /usr/lib/postgresql/N/bin) and,
when the tests run as root, runs it as the ``postgres`` user (initdb and postgres refuse root).
Redis is started by pytest-redis from ``redis-server`` on PATH, S3 by moto's
``ThreadedMotoServer`` in this process.

A fresh empty database per test module::

    @pytest.fixture(scope="module")
    def db_url(postgres_server):
        url = postgres_server.create_database()
        yield url
        postgres_server.drop_database(url)
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import boto3
import pytest
from moto.server import ThreadedMotoServer
from pytest_postgresql import factories as pg_factories
from pytest_postgresql.janitor import DatabaseJanitor
from pytest_redis import factories as redis_factories

PG_CTL = Path(__file__).resolve().parent / "bin" / "pg_ctl"

# port=None: any free port (never the machine's own 5432 / 6379 servers).
lathe_postgresql_proc = pg_factories.postgresql_proc(
    executable=str(PG_CTL), host="127.0.0.1", port=None, user="postgres"
)
lathe_redis_proc = redis_factories.redis_proc(host="127.0.0.1", port=None)


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    host: str
    port: int
    user: str
    password: str | None = None
    maintenance_dbname: str = "postgres"

    @classmethod
    def from_url(cls, url: str) -> PostgresServer:
        parts = urlsplit(url)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL of database ``dbname`` on this server."""
        auth = quote(self.user, safe="")
        if self.password is not None:
            auth += ":" + quote(self.password, safe="")
        return f"postgresql+psycopg://{auth}@{self.host}:{self.port}/{dbname}"

    def _janitor(self, dbname: str) -> DatabaseJanitor:
        return DatabaseJanitor(
            user=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            dbname=dbname,
            maintenance_dbname=self.maintenance_dbname,
        )

    def create_database(self, prefix: str = "lathe_test") -> str:
        """Create an empty database with a unique name; return its URL."""
        dbname = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._janitor(dbname).init()
        return self.url(dbname)

    def drop_database(self, url: str) -> None:
        """Drop the database ``url`` names, disconnecting whoever is still on it."""
        self._janitor(urlsplit(url).path.lstrip("/")).drop()


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> PostgresServer:
    """The PostgreSQL server: LATHE_TEST_DATABASE_URL's, else a throwaway one."""
    url = os.environ.get("LATHE_TEST_DATABASE_URL")
    if url:
        return PostgresServer.from_url(url)
    proc = request.getfixturevalue("lathe_postgresql_proc")
    return PostgresServer(host=proc.host, port=proc.port, user=proc.user, password=proc.password)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a database for the session: LATHE_TEST_DATABASE_URL, else a fresh empty one."""
    url = os.environ.get("LATHE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    url = postgres_server.create_database("lathe")
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a new empty database for one test, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """``redis://host:port/0``: LATHE_TEST_REDIS_URL, else a throwaway redis-server."""
    url = os.environ.get("LATHE_TEST_REDIS_URL")
    if url:
        return url
    proc = request.getfixturevalue("lathe_redis_proc")
    return f"redis://{proc.host}:{proc.port}/0"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server (or LATHE_TEST_S3_ENDPOINT_URL).

    Sets AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION=us-east-1 for the
    session. moto keeps its state in this process: ``mock_aws`` in a test shares (and a
    moto reset clears) what this server holds.
    """
    url = os.environ.get("LATHE_TEST_S3_ENDPOINT_URL")
    env = pytest.MonkeyPatch()
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in fake.items():
        if not (url and os.environ.get(name)):
            env.setenv(name, value)
    if not url:
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_SECURITY_TOKEN", raising=False)
    try:
        if url:
            yield url
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            # stop() leaves the listening socket open; close it so the port is released.
            if server._server is not None:
                server._server.server_close()
    finally:
        env.undo()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """Name of a new empty bucket on ``s3_endpoint``, emptied and deleted afterwards."""
    yield from _bucket(s3_endpoint)


def _bucket(s3_endpoint: str) -> Iterator[str]:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"lathe-test-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys})
    s3.delete_bucket(Bucket=name)


# --- Lathe itself on those services -------------------------------------------------------


@pytest.fixture(scope="session")
def stack_bucket(s3_endpoint: str) -> Iterator[str]:
    """A bucket for the whole session's Lathe object store."""
    yield from _bucket(s3_endpoint)


@pytest.fixture(scope="session")
def mlflow_tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a real `mlflow server` for the session (SQLite, artifacts
    served by it): LATHE_MLFLOW_TRACKING_URI for the tracking tests. tests/tracking_server.py
    starts it (and one a test may stop, `running_mlflow_server`)."""
    from tests.tracking_server import running_mlflow_server

    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server.uri


@pytest.fixture(scope="session")
def stack_env(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_url: str,
    redis_url: str,
    s3_endpoint: str,
    stack_bucket: str,
) -> dict[str, str]:
    """LATHE_* variables of a production-shaped deployment: Postgres, Redis, S3.

    The schema is built by the Alembic migrations, as `lathe migrate` does.
    """
    from app.migrate import upgrade

    env = {
        "LATHE_HOME": str(tmp_path_factory.mktemp("lathe-home")),
        "LATHE_DATABASE_URL": postgres_url,
        "LATHE_BROKER_URL": redis_url,
        "LATHE_STORAGE_URL": f"s3://{stack_bucket}/lathe",
        "LATHE_S3_ENDPOINT_URL": s3_endpoint,
        "LATHE_CANCEL_POLL_SECONDS": "0",  # check for a cancel at every step
        # The tests' webhook receivers listen on 127.0.0.1, denied by default.
        "LATHE_WEBHOOK_DENIED_NETWORKS": '["169.254.0.0/16"]',
    }
    upgrade(postgres_url)
    return env


def settings_from(env: dict[str, str]):
    """Settings from LATHE_* variables, parsed as pydantic-settings parses the environment
    (complex values are JSON)."""
    from app.config import Settings

    def value(raw: str):
        return json.loads(raw) if raw[:1] in "{[" else raw

    return Settings(**{k.removeprefix("LATHE_").lower(): value(v) for k, v in env.items()})


def create_team_key(env: dict[str, str], prefix: str = "team") -> tuple[str, str]:
    """A new team in the stack's database: (team id, API key)."""
    from app.db import make_engine, make_sessionmaker
    from app.services.teams import create_team

    engine = make_engine(env["LATHE_DATABASE_URL"])
    with make_sessionmaker(engine)() as session:
        team, key = create_team(session, f"{prefix}-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    return team.id, key


def wait_for(check, deadline_s: float, interval: float = 0.25, what: str = "condition"):
    """Poll `check()` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {deadline_s} s waiting for {what}")


@contextmanager
def serve_in_thread(env: dict[str, str], **config) -> Iterator[str]:
    """The API for `env` under a real uvicorn in a thread, on a free loopback port: its
    base URL while the block runs. The socket is bound before the server starts, so no
    other process can take the port in between."""
    import uvicorn

    from app.main import create_app

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings_from(env)), log_level="warning", **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, 0.05, what="uvicorn to start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
