"""Schema version 1, as the program made it by hand before Alembic (``meta.schema_version = '1'``).

A ledger made before Alembic is stamped at this revision (not re-created) and upgraded from here.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = "status IN ('pending', 'applied', 'reverted', 'superseded', 'refused', 'failed')"
KINDS = ("kind IN ('applied', 'reverted', 'reapplied', 'superseded', 'replayed', 'imported', 'refused', "
         "'failed', 'repaired')")


def upgrade() -> None:
    op.create_table(
        "edits",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("relation", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("answer_before", sa.Text),
        sa.Column("answer_after", sa.Text),
        sa.Column("layer", sa.Integer, nullable=False),
        sa.Column("param_name", sa.String(256), nullable=False),
        sa.Column("factors", sa.LargeBinary),
        sa.Column("factors_sha256", sa.String(64)),
        sa.Column("meta_json", sa.Text, nullable=False),
        sa.Column("hparams_json", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("checksum_before", sa.String(64)),
        sa.Column("checksum_after", sa.String(64)),
        sa.Column("state_checksum", sa.String(64)),
        sa.Column("probes_json", sa.Text, nullable=False),
        sa.Column("superseded_by", sa.Integer, sa.ForeignKey("edits.id")),
        sa.Column("position", sa.Integer),
        sa.Column("note", sa.Text),
        sa.Column("author", sa.String(256)),
        sa.Column("refusal_reason", sa.Text),
        sa.CheckConstraint(STATUSES, name="edit_status"),
    )
    op.create_index("ix_edits_position", "edits", ["position"])
    op.create_index("ix_edits_status", "edits", ["status"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("edit_id", sa.Integer, sa.ForeignKey("edits.id")),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256)),
        sa.Column("detail", sa.Text),
        sa.CheckConstraint(KINDS, name="event_kind"),
    )
    op.create_index("ix_events_edit_id", "events", ["edit_id"])
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    for table in ("events", "edits", "meta"):
        op.drop_table(table)
