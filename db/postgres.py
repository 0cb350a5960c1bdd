"""PostgreSQL specifics of the ledger: writers serialised by the database, as SQLite's ``BEGIN IMMEDIATE`` does.

Every writing transaction (one without the ``READ_ONLY`` execution option) starts by taking a
transaction-scoped advisory lock, so read-modify-write steps (the dense applied sequence, "is
this fact already corrected?") see every earlier writer's commit, from any instance or the CLI.
Readers take no lock and see a consistent snapshot per statement.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, text

from db.engine import READ_ONLY

WRITER_LOCK = 0x726F6D66  # advisory lock key of the ledger's writers


def _on_begin(conn: Any) -> None:
    if not conn.get_execution_options().get(READ_ONLY):
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITER_LOCK})


def serialise_writers(engine: Engine) -> None:
    """Install the writer lock on ``engine`` (PostgreSQL only; other databases are left as they are)."""
    if engine.dialect.name == "postgresql":
        event.listen(engine, "begin", _on_begin)
