"""Checkpoints: the adapter alone, as a file the team can download

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14 10:00:00

A checkpoint written before this one has only its Trainer tarball: its adapter_file stays
NULL. Deleting the file sets it back to NULL (the index serves that delete's lookup).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter_file", sa.String(length=40), nullable=True))
        batch_op.create_index("ix_checkpoints_adapter_file", ["adapter_file"])
        batch_op.create_foreign_key(
            "fk_checkpoints_adapter_file", "files", ["adapter_file"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_constraint("fk_checkpoints_adapter_file", type_="foreignkey")
        batch_op.drop_index("ix_checkpoints_adapter_file")
        batch_op.drop_column("adapter_file")
