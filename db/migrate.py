"""The ledger's schema, managed by Alembic: migrations in db/migrations/, run in code (no alembic.ini).

``upgrade_schema`` is called when a ledger is opened. It does nothing (and writes nothing,
so read-only ledgers open) when the schema is current. Otherwise, in one transaction holding
the migration lock (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL, so two
instances starting together migrate once), it creates a new ledger, or stamps a ledger made
before Alembic (``meta.schema_version = '1'``) at revision 0001 and upgrades it in place.

A developer adds a migration with ``python -m db.migrate revision "message"``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text

from db.engine import READ_ONLY
from db.schema import LedgerError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema that carried meta.schema_version = '1' before Alembic
MIGRATION_LOCK = 0x726F6D65  # PostgreSQL advisory lock key ("rome")
NEW = "new"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or BASELINE


def current_revision(conn: Connection, where: str) -> str:
    """The ledger's revision; ``BASELINE`` for a ledger from before Alembic, ``NEW`` for none yet."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables:
        revision = MigrationContext.configure(conn).get_current_revision()
        return revision or NEW
    if "meta" in tables:
        stored = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
        if stored == "1":
            return BASELINE
        raise LedgerError(
            f"ledger {where} has schema version {stored!r} but no migration record; this program reads "
            "version 1 ledgers and newer ones it migrated itself. Start a new ledger with another --db path "
            "(edits can be moved with export and import)."
        )
    if "edits" in tables:
        raise LedgerError(
            f"{where} has an 'edits' table but no schema version: it was not made by this program. "
            "Start with another --db path."
        )
    return NEW


def _check_known(revision: str, where: str) -> None:
    if revision == NEW:
        return
    try:
        known = ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except CommandError:
        known = None
    if known is None:
        raise LedgerError(
            f"ledger {where} is at schema revision {revision!r}, which this program does not know: it was "
            "written by a newer version of this program. Upgrade the program, or start a new ledger with "
            "another --db path."
        )


def upgrade_schema(engine: Engine, where: str) -> None:
    """Bring the ledger's schema to the current head (see the module docstring)."""
    target = head()
    with engine.execution_options(**{READ_ONLY: True}).connect() as conn:
        revision = current_revision(conn, where)
    _check_known(revision, where)
    if revision == target:
        return
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        revision = current_revision(conn, where)  # again, under the lock: another process may have done it
        _check_known(revision, where)
        if revision == target:
            return
        cfg = alembic_config(conn)
        if revision == BASELINE and "alembic_version" not in inspect(conn).get_table_names():
            command.stamp(cfg, BASELINE)
            log.info("ledger %s: schema version 1 from before Alembic, stamped %s", where, BASELINE)
        command.upgrade(cfg, target)
    log.info("ledger %s: schema upgraded from %s to %s", where, revision, target)


def _main(argv: list[str]) -> int:
    """``python -m db.migrate revision MESSAGE``: a new, empty migration file for a developer to fill in."""
    if len(argv) != 2 or argv[0] != "revision":
        print("usage: python -m db.migrate revision MESSAGE", file=sys.stderr)  # noqa: T201 - a developer tool
        return 2
    script = ScriptDirectory.from_config(alembic_config())
    number = f"{int(script.get_current_head() or '0') + 1:04d}"
    command.revision(alembic_config(), message=argv[1], rev_id=number)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
