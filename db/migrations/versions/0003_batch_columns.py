"""Batch columns on ``edits``: the MEMIT batch a fact was edited in, its place in it, and the batch's size.

A batch's facts are separate edits (each revertible alone); these columns group them so the
history can filter by batch and a whole batch can be reverted or re-applied. Edits made one by
one keep NULL. The columns are derived from the edit's meta (``stats.batch``) when it is
recorded, so an edit imported from a pack keeps its batch.

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("edits", sa.Column("batch_id", sa.String(32)))
    op.add_column("edits", sa.Column("batch_index", sa.Integer))
    op.add_column("edits", sa.Column("batch_size", sa.Integer))
    op.create_index("ix_edits_batch_id", "edits", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_edits_batch_id", "edits")
    for column in ("batch_size", "batch_index", "batch_id"):
        op.drop_column("edits", column)
