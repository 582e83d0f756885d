"""SQLAlchemy 2 tables. Alembic migrations (migrations/) build the schema from these."""

from __future__ import annotations

import time

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.domain.workers import WorkerState

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
    # Fair share: a team with weight 2 is entitled to twice the GPU time of weight 1.
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # Quotas; NULL takes the deployment default (LATHE_DEFAULT_QUOTAS).
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    max_file_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_hours_per_month: Mapped[float | None] = mapped_column(Float)
    # Recent GPU use for fair share: GPU seconds decayed with the configured half-life,
    # as of `usage_updated_at` (epoch seconds). Kept per team so a scheduling pass reads
    # 100 team rows, not every job's history.
    usage_gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    usage_updated_at: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # False: an administrator's mark; the scheduler never preempts this team's jobs.
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")


class ApiKey(Base):
    __tablename__ = "api_keys"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str | None] = mapped_column(String(40), unique=True)
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
    # Pool work of two kinds: "fine_tune" (a training job, /v1/fine_tuning/jobs) and
    # "export" (a fine-tuned model written out as merged weights or GGUF, an ftexp- id,
    # /v1/fine_tuning/jobs/{id}/exports; app.services.exports). Both are scheduled,
    # metered and cancelled alike; the jobs API shows fine-tunes only.
    kind: Mapped[str] = mapped_column(String(16), default="fine_tune", server_default="fine_tune")
    # An export's job (the fine-tune it writes out) and its request: {"format", "dtype",
    # "quantization", "base_weights", "checkpoint" (ftckpt- id or None), "step_number"}.
    # The adapter it reads is in `parent`, as for a job training on from a fine-tuned model.
    source_job_pk: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.pk", ondelete="CASCADE", name="fk_jobs_source_job"), index=True
    )
    export: Mapped[dict | None] = mapped_column(JSON)
    # "supervised" or "dpo" (preference pairs); the training file's format agrees with it.
    method: Mapped[str] = mapped_column(
        String(16), default="supervised", server_default="supervised"
    )
    # Resolved values: n_epochs, batch_size, learning_rate_multiplier; and beta for dpo.
    hyperparameters: Mapped[dict] = mapped_column(JSON)
    # Training on from a fine-tuned model (`model` was an ft: name or a checkpoint's): the
    # adapter it starts from, {"fine_tuned_model", "job", "checkpoint" (ftckpt- id or None),
    # "storage_key" (the object the worker downloads), "archive" ("adapter": the parent's
    # adapter.tar.gz; "checkpoint": a Trainer checkpoint tarball)}. NULL: from the base.
    # `model` stays the base's name either way: the worker loads its weights by it.
    parent: Mapped[dict | None] = mapped_column(JSON)
    # The models this one descends from, oldest first: the base's name, then each ft model
    # (or checkpoint) trained on, ending with the parent; [model] for a job from the base.
    lineage: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    # Experiment tracking asked for, in OpenAI's shape: [{"type": "wandb", "wandb": {...}},
    # {"type": "mlflow", "mlflow": {...}}]; the runs' URLs land in stats["tracking"].
    integrations: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    lora: Mapped[dict] = mapped_column(JSON)
    quantization: Mapped[dict] = mapped_column(JSON)
    max_seq_length: Mapped[int] = mapped_column(Integer)
    # How the worker trains (TrainingIn: loss coverage, packing, memory and speed, evaluation).
    training: Mapped[dict] = mapped_column(JSON, default=dict, server_default="{}")
    # What the worker measured, by kind: tokens (per file), model, throughput, sample.
    stats: Mapped[dict | None] = mapped_column(JSON)
    data_format: Mapped[str | None] = mapped_column(String(32))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[dict | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(200))
    # Claims by a worker (pause/resume and re-queues included); the fencing of a run's
    # writes (app.services.lifecycle.run_fence).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Workers lost or restarted while running the job (a stop on purpose is not counted);
    # the third fails it.
    worker_losses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Scheduling: priority within the team, the class asked for (NULL: any that fits),
    # the memory estimate, and the dispatch (late: only when a slot of the class is free).
    priority: Mapped[str] = mapped_column(String(8), default="normal", server_default="normal")
    gpu_class: Mapped[str | None] = mapped_column(String(64))
    memory_gb: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    dispatched_at: Mapped[int | None] = mapped_column(BigInteger)
    dispatched_class: Mapped[str | None] = mapped_column(String(64))
    # Fencing token: bumped on every dispatch; a task carrying an older one is a no-op.
    dispatch_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # GPU seconds metered by the worker, start to end of training, all attempts.
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    # Multi-GPU: the GPUs of one host the job asks for (gang: all at once), "ddp" or
    # "fsdp" (resolved at creation), the device indexes on its worker it holds from its
    # claim to the end of its run, and the worker whose own queue its dispatch went to.
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    parallelism: Mapped[str | None] = mapped_column(String(8))
    devices: Mapped[list | None] = mapped_column(JSON(none_as_null=True))  # NULL: holds none
    dispatched_worker: Mapped[str | None] = mapped_column(String(200))
    # Preemption: times the scheduler paused the job for another team, when it last did
    # (set while the job waits to resume automatically), and an administrator's mark.
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    preempted_at: Mapped[int | None] = mapped_column(BigInteger)
    # The host whose GPUs a preemption is freeing for this job: it goes there first.
    earmarked_worker: Mapped[str | None] = mapped_column(String(200))
    preemptible: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")

    team: Mapped[Team] = relationship()

    __table_args__ = (
        # The scheduler's reads: each team's waiting jobs, and dispatches not yet claimed.
        Index(
            "ix_jobs_waiting",
            "team_pk",
            "created_at",
            postgresql_where=text("status = 'queued' AND dispatched_at IS NULL"),
            sqlite_where=text("status = 'queued' AND dispatched_at IS NULL"),
        ),
        Index(
            "ix_jobs_dispatched",
            "dispatched_class",
            postgresql_where=text("dispatched_at IS NOT NULL"),
            sqlite_where=text("dispatched_at IS NOT NULL"),
        ),
        # The jobs a preemption is freeing GPUs for (scheduler passes).
        Index(
            "ix_jobs_earmarked",
            "earmarked_worker",
            postgresql_where=text("earmarked_worker IS NOT NULL"),
            sqlite_where=text("earmarked_worker IS NOT NULL"),
        ),
        # The runs holding GPUs, per worker (claims, scheduler passes).
        Index(
            "ix_jobs_holding",
            "worker",
            postgresql_where=text("devices IS NOT NULL"),
            sqlite_where=text("devices IS NOT NULL"),
        ),
    )


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
    # The whole Trainer checkpoint (adapter, optimizer, scheduler, RNG): what resuming reads.
    storage_key: Mapped[str] = mapped_column(String(512))
    # The adapter alone, as the team's fine-tune-results file (files.id), downloadable like
    # the job's adapter.tar.gz. NULL for checkpoints written before 0008, and once the team
    # deletes that file (nothing else reads it).
    adapter_file: Mapped[str | None] = mapped_column(
        String(40),
        ForeignKey("files.id", ondelete="SET NULL", name="fk_checkpoints_adapter_file"),
        index=True,
    )


class Worker(Base):
    """One worker host (a Celery worker process managing the host's GPUs) and its heartbeat."""

    __tablename__ = "workers"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(200), unique=True)
    host: Mapped[str] = mapped_column(String(200))
    gpu_name: Mapped[str] = mapped_column(String(200))
    gpu_class: Mapped[str] = mapped_column(String(64), index=True)
    memory_gb: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default=WorkerState.ACTIVE)
    current_job: Mapped[str | None] = mapped_column(String(40))
    # The host's GPUs: it runs jobs on them side by side, a multi-GPU job on several.
    gpus: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[int] = mapped_column(BigInteger, default=now)
    last_seen: Mapped[float] = mapped_column(Float)


class AdminKey(Base):
    """Operator keys for /v1/admin; separate from team keys and never scoped to a team."""

    __tablename__ = "admin_keys"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class AuditEntry(Base):
    """One admin action: who, what, on which object, with which values."""

    __tablename__ = "audit_log"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict | None] = mapped_column(JSON)


class IdempotencyKey(Base):
    """A client's Idempotency-Key and the response it got, replayed on a retry."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("team_pk", "endpoint", "key"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    team_pk: Mapped[int] = mapped_column(ForeignKey("teams.pk", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | done
    response: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class Webhook(Base):
    """A team's endpoint for job outcomes: Lathe POSTs signed events to `url`."""

    __tablename__ = "webhooks"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    team_pk: Mapped[int] = mapped_column(ForeignKey("teams.pk", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    # Standard Webhooks signing secret, "whsec_" + base64 of 32 random bytes. Shown once.
    secret: Mapped[str] = mapped_column(String(128))
    event_types: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """One event for one webhook: written in the transaction that finished the job (an
    outbox), then POSTed, retried with backoff until the endpoint answers 2xx."""

    __tablename__ = "webhook_deliveries"

    pk: Mapped[int] = mapped_column(PK, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)  # the event id, webhook-id
    webhook_pk: Mapped[int] = mapped_column(
        ForeignKey("webhooks.pk", ondelete="CASCADE"), index=True
    )
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due (a claim pushes it out, so one sender has it at a time).
    next_attempt_at: Mapped[float] = mapped_column(Float)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )
