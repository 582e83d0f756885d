"""Exports: pool work that writes a fine-tuned model out as merged weights or GGUF

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-15 10:00:00

An export is a row of `jobs` (kind "export") so the scheduler, the workers' claim and
fencing, cancel, events and metering treat it like a training job; every row before this
one is a fine-tune. `source_job_pk` names the job it exports (its exports go with it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="fine_tune")
        )
        batch_op.add_column(
            sa.Column(
                "source_job_pk",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("export", sa.JSON(), nullable=True))
        batch_op.create_index("ix_jobs_source_job_pk", ["source_job_pk"])
        batch_op.create_foreign_key(
            "fk_jobs_source_job", "jobs", ["source_job_pk"], ["pk"], ondelete="CASCADE"
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_source_job", type_="foreignkey")
        batch_op.drop_index("ix_jobs_source_job_pk")
        batch_op.drop_column("export")
        batch_op.drop_column("source_job_pk")
        batch_op.drop_column("kind")
