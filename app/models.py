"""SQLAlchemy 2 tables. Alembic migrations (migrations/) build the schema from these."""

from __future__ import annotations

import time

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Integer primary keys on SQLite must be INTEGER to autoincrement; BIGINT elsewhere.
PK = BigInteger().with_variant(Integer(), "sqlite")


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    team_pk: Mapped[int] = mapped_column(ForeignKey("teams.pk", ondelete="CASCADE"), index=True)
    # sha256 of the key: keys are 256-bit random, so a fast hash is enough.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)

    team: Mapped[Team] = relationship()


class File(Base):
    __tablename__ = "files"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    team_pk: Mapped[int] = mapped_column(ForeignKey("teams.pk", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text)
    # Dataset facts found by validation (fine-tune files only).
    format: Mapped[str | None] = mapped_column(String(32))
    examples: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Job(Base):
    __tablename__ = "jobs"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    team_pk: Mapped[int] = mapped_column(ForeignKey("teams.pk", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(32), index=True)
    # Resolved values: n_epochs, batch_size, learning_rate_multiplier.
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    lora: Mapped[dict] = mapped_column(JSON)
    quantization: Mapped[dict] = mapped_column(JSON)
    max_seq_length: Mapped[int] = mapped_column(Integer)
    data_format: Mapped[str | None] = mapped_column(String(32))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[dict | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)

    team: Mapped[Team] = relationship()


class JobEvent(Base):
    __tablename__ = "job_events"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.pk", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)
    fine_tuned_model_checkpoint: Mapped[str] = mapped_column(String(300))
    storage_key: Mapped[str] = mapped_column(String(512))
