"""Jobs: the count of workers lost, stopped or restarted while running the job

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 13:30:00

The scheduler used to count a job's losses by matching its events' text ("Worker % was
lost%"), which missed restarts ("Worker X restarted; the job is back in line"): a job
that took its worker down each time was re-queued forever. Unfinished jobs get the count
their events show so far, restarts included.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("worker_losses", sa.Integer(), server_default="0", nullable=False)
        )
    op.execute(
        sa.text(
            "UPDATE jobs SET worker_losses = ("
            " SELECT count(*) FROM job_events WHERE job_events.job_pk = jobs.pk"
            " AND (job_events.message LIKE :lost OR job_events.message LIKE :restarted))"
            " WHERE status IN ('queued', 'running', 'paused')"
        ).bindparams(
            lost="Worker % was lost; the job is back in line%",
            restarted="Worker % restarted; the job is back in line%",
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("worker_losses")
