"""A job's world for the worker's job-level tests: Settings on a fresh Postgres database
(migrated) and S3 bucket, its sessions and its object store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.migrate import upgrade
from app.storage import ObjectStore, open_store


@pytest.fixture
def settings(tmp_path: Path, fresh_postgres_url: str, s3_endpoint: str, s3_bucket: str) -> Settings:
    upgrade(fresh_postgres_url)
    return Settings(
        home=tmp_path,
        database_url=fresh_postgres_url,
        storage_url=f"s3://{s3_bucket}/lathe",
        s3_endpoint_url=s3_endpoint,
        cancel_poll_seconds=0,  # see a pause at the next step
        device="cpu",
    )


@pytest.fixture
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.resolved_database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return open_store(settings.resolved_storage_url, settings.s3_endpoint_url)
