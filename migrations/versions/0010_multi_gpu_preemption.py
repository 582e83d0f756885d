"""Multi-GPU jobs and preemption: a job's GPU count and parallelism, the devices of its
worker it holds, preemption counts and marks, and each worker's GPU count

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-20 10:00:00

A worker row is now a host with `gpus` devices (1 for every row before this one); a job
asks for `gpus` of one host (gang: all at once), holds `devices` (indexes on its worker)
from its claim to the end of its run, and is dispatched to one worker's own queue
(`dispatched_worker`). `preemptions` counts the times the scheduler paused it for another
team, `preempted_at` marks a job paused that way (resumed automatically), and
`preemptible` on a job or a team is an administrator's mark; `earmarked_worker` is the
host whose GPUs a preemption is freeing for the job (it goes there first).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("parallelism", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("devices", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("dispatched_worker", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("preempted_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("earmarked_worker", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("preemptible", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
    # Runs in progress hold their worker's only device. Only running jobs: a worker row
    # can still name a job paused or cancelled long ago as its current job, and holding a
    # device for it would close that host for good. A stop in progress during the upgrade
    # frees its device when its run ends, as before.
    op.execute(
        sa.text(
            "UPDATE jobs SET devices = '[0]' WHERE status = 'running'"
            " AND worker IS NOT NULL AND id IN (SELECT current_job FROM workers"
            " WHERE current_job IS NOT NULL)"
        )
    )
    # The jobs a preemption is freeing GPUs for (a handful): read on every scheduler pass.
    op.create_index(
        "ix_jobs_earmarked",
        "jobs",
        ["earmarked_worker"],
        postgresql_where=sa.text("earmarked_worker IS NOT NULL"),
        sqlite_where=sa.text("earmarked_worker IS NOT NULL"),
    )
    # The runs holding GPUs, per worker: read on every claim and scheduler pass.
    op.create_index(
        "ix_jobs_holding",
        "jobs",
        ["worker"],
        postgresql_where=sa.text("devices IS NOT NULL"),
        sqlite_where=sa.text("devices IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_holding", table_name="jobs")
    op.drop_index("ix_jobs_earmarked", table_name="jobs")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("gpus")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("preemptible")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in (
            "preemptible",
            "earmarked_worker",
            "preempted_at",
            "preemptions",
            "dispatched_worker",
            "devices",
            "parallelism",
            "gpus",
        ):
            batch_op.drop_column(column)
