"""Jobs: the training method, the fine-tuned model a job trains on from, its lineage, and
its experiment-tracking integrations

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 10:00:00

Every job before this one was supervised and trained from its base model, without
tracking: the defaults say so, and each existing job's lineage is its base model alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("method", sa.String(length=16), server_default="supervised", nullable=False)
        )
        batch_op.add_column(sa.Column("parent", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("lineage", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(
            sa.Column("integrations", sa.JSON(), server_default="[]", nullable=False)
        )
    # A one-element JSON array of the model's name, in each database's JSON function.
    build_array = "json_build_array" if op.get_bind().dialect.name == "postgresql" else "json_array"
    op.execute(sa.text(f"UPDATE jobs SET lineage = {build_array}(model)"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("integrations")
        batch_op.drop_column("lineage")
        batch_op.drop_column("parent")
        batch_op.drop_column("method")
