"""JSON columns as JSONB on PostgreSQL; a ``revision`` counter bumped by every write (and NOTIFY on PostgreSQL).

Instances follow the ledger by watching ``meta.revision``: triggers on ``edits`` and ``events``
bump it in the writing transaction, so writes by any program (app, CLI, an older build) count.
On PostgreSQL the trigger also sends ``NOTIFY rome_chat_ledger`` (delivered at commit). On
SQLite the JSON columns keep their TEXT storage (SQLAlchemy's JSON type reads it as is).
``meta.schema_version`` becomes '2', so a program from before Alembic refuses the ledger.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON_COLUMNS = ("meta_json", "hparams_json", "probes_json")
BUMP = "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'revision'"
PG_FUNCTION = """
CREATE FUNCTION rome_chat_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE rev bigint;
BEGIN
    UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'revision' RETURNING value::bigint INTO rev;
    PERFORM pg_notify('rome_chat_ledger', rev::text);
    RETURN NULL;
END $$
"""
TRIGGERS = (("edits", "INSERT"), ("edits", "UPDATE"), ("edits", "DELETE"), ("events", "INSERT"))


def upgrade() -> None:
    op.execute("INSERT INTO meta (key, value) VALUES ('revision', '0')")
    if op.get_bind().dialect.name == "postgresql":
        for column in JSON_COLUMNS:
            op.execute(f"ALTER TABLE edits ALTER COLUMN {column} TYPE JSONB USING {column}::jsonb")
        op.execute(PG_FUNCTION)
        for table, action in TRIGGERS:
            op.execute(f"CREATE TRIGGER {table}_{action.lower()}_revision AFTER {action} ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION rome_chat_bump_revision()")  # fmt: skip
    else:
        for table, action in TRIGGERS:
            op.execute(f"CREATE TRIGGER {table}_{action.lower()}_revision AFTER {action} ON {table} "
                       f"FOR EACH ROW BEGIN {BUMP}; END")  # fmt: skip
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")


def downgrade() -> None:
    for table, action in TRIGGERS:
        op.execute(f"DROP TRIGGER {table}_{action.lower()}_revision" + (
            f" ON {table}" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION rome_chat_bump_revision()")
        for column in JSON_COLUMNS:
            op.execute(f"ALTER TABLE edits ALTER COLUMN {column} TYPE TEXT USING {column}::text")
    op.execute("DELETE FROM meta WHERE key = 'revision'")
    op.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
