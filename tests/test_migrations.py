"""The Alembic migrations, not create_all, build a schema that matches the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from app.migrate import upgrade
from app.models import Base, Job


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


def assert_existing_jobs_get_0007s_defaults(url: str) -> None:
    """A job from before 0007 reads as what it was: supervised, from its base model (its
    lineage that base alone), no parent, no integrations."""
    upgrade(url, "0006")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO teams (id, name, created_at) VALUES ('team-m', 'm', 0)"))
        conn.execute(
            text(
                "INSERT INTO jobs (id, team_pk, model, training_file, status, hyperparameters,"
                " lora, quantization, max_seq_length, seed, result_files, attempt, created_at)"
                " SELECT 'ftjob-old', pk, 'tiny-random-llama', 'file-x', 'succeeded', '{}',"
                " '{}', '{}', 1024, 1, '[]', 1, 0 FROM teams WHERE id = 'team-m'"
            )
        )
    upgrade(url)
    with engine.connect() as conn:
        row = conn.execute(
            select(Job.method, Job.parent, Job.lineage, Job.integrations).where(
                Job.id == "ftjob-old"
            )
        ).one()
    engine.dispose()
    assert tuple(row) == ("supervised", None, ["tiny-random-llama"], [])


def test_0007_gives_existing_jobs_their_defaults_on_postgres(fresh_postgres_url: str) -> None:
    assert_existing_jobs_get_0007s_defaults(fresh_postgres_url)


def test_0007_gives_existing_jobs_their_defaults_on_sqlite(tmp_path) -> None:
    assert_existing_jobs_get_0007s_defaults(f"sqlite:///{tmp_path / 'lathe.db'}")
