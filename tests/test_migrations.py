"""The Alembic migrations, not create_all, build a schema that matches the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.migrate import upgrade
from app.models import Base


def assert_schema_matches_models(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    engine.dispose()
    assert diff == []
    assert {"teams", "api_keys", "files", "jobs", "job_events", "checkpoints"} <= tables


def test_migrations_build_the_schema_on_postgres(fresh_postgres_url: str) -> None:
    assert_schema_matches_models(fresh_postgres_url)


def test_migrations_build_the_schema_on_sqlite(tmp_path) -> None:
    assert_schema_matches_models(f"sqlite:///{tmp_path / 'lathe.db'}")
