"""GPU pool: workers, fair-share and quota columns, admin keys, audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:04:11.398161
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_keys",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table(
        "audit_log",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=200), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_created_at"), ["created_at"], unique=False)

    op.create_table(
        "workers",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("gpu_name", sa.String(length=200), nullable=False),
        sa.Column("gpu_class", sa.String(length=64), nullable=False),
        sa.Column("memory_gb", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("current_job", sa.String(length=40), nullable=True),
        sa.Column("jobs_done", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("id"),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_gpu_class"), ["gpu_class"], unique=False)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("id", sa.String(length=40), nullable=True))
        batch_op.create_unique_constraint("uq_api_keys_id", ["id"])
    op.execute("UPDATE api_keys SET id = 'key-' || pk WHERE id IS NULL")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.String(length=8), server_default="normal", nullable=False)
        )
        batch_op.add_column(sa.Column("gpu_class", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("memory_gb", sa.Float(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("dispatched_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("dispatched_class", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("dispatch_token", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("gpu_seconds", sa.Float(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("disabled", sa.Boolean(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("max_running_jobs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_queued_jobs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_file_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("gpu_hours_per_month", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("usage_gpu_seconds", sa.Float(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("usage_updated_at", sa.Float(), server_default="0", nullable=False)
        )
    op.create_index(
        "ix_jobs_waiting",
        "jobs",
        ["team_pk", "created_at"],
        postgresql_where=sa.text("status = 'queued' AND dispatched_at IS NULL"),
        sqlite_where=sa.text("status = 'queued' AND dispatched_at IS NULL"),
    )
    op.create_index(
        "ix_jobs_dispatched",
        "jobs",
        ["dispatched_class"],
        postgresql_where=sa.text("dispatched_at IS NOT NULL"),
        sqlite_where=sa.text("dispatched_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_dispatched", table_name="jobs")
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("usage_updated_at")
        batch_op.drop_column("usage_gpu_seconds")
        batch_op.drop_column("gpu_hours_per_month")
        batch_op.drop_column("max_file_bytes")
        batch_op.drop_column("max_queued_jobs")
        batch_op.drop_column("max_running_jobs")
        batch_op.drop_column("disabled")
        batch_op.drop_column("weight")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("gpu_seconds")
        batch_op.drop_column("dispatch_token")
        batch_op.drop_column("dispatched_class")
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("memory_gb")
        batch_op.drop_column("gpu_class")
        batch_op.drop_column("priority")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint("uq_api_keys_id", type_="unique")
        batch_op.drop_column("id")

    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_gpu_class"))

    op.drop_table("workers")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_created_at"))

    op.drop_table("audit_log")
    op.drop_table("admin_keys")
