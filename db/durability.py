"""What keeps a SQLite ledger whole on disk: checkpoints, one-file backups, and honest diagnoses of a damaged file.

A SQLite ledger in WAL mode is up to three files: ``ledger.db`` (the database), ``ledger.db-wal``
(committed changes not yet copied into it) and ``ledger.db-shm`` (an index of the WAL, rebuilt at
will). Committed changes live in ``-wal`` until a checkpoint copies them into ``ledger.db``. So we
checkpoint after every commit (``wal_autocheckpoint``, set per connection in ``db.engine``) and
truncate the WAL on close: a stopped app leaves everything in ``ledger.db``. ``backup`` writes one
consistent file with SQLite's online backup API, safe while the app is running.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from sqlalchemy import URL, Engine, inspect, text

from db.schema import LedgerError

logger = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_BYTES = 100


class LedgerFiles:
    """The ``Ledger`` methods about its files: checkpoint and backup (SQLite only)."""

    url: URL
    where: str
    file: Path | None
    _engine: Engine

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database file and truncate it; other databases: nothing to do."""
        if self.file is None:
            return
        busy, frames, done = checkpoint(self._engine, "TRUNCATE")
        if busy or frames != done:
            logger.warning("ledger %s: checkpoint incomplete (%d of %d WAL frames; busy=%d)", self.where, done,
                           frames, busy)  # fmt: skip

    def backup(self, target: str | Path) -> Path:
        """Write the whole ledger to ``target`` as one consistent SQLite file (safe while others write)."""
        if self.url.get_backend_name() != "sqlite":
            raise LedgerError(f"backup writes SQLite files; back up {self.where} with the database's own tool "
                              "(PostgreSQL: pg_dump)")  # fmt: skip
        return backup(self._engine, self.where, Path(target))


def checkpoint(engine: Engine, mode: str = "TRUNCATE") -> tuple[int, int, int]:
    """Copy the WAL into the database file (``mode`` TRUNCATE also empties the WAL file).

    Returns SQLite's ``(busy, wal_frames, checkpointed_frames)``; busy=1 means a reader held it back.
    """
    if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
        raise ValueError(f"unknown checkpoint mode {mode!r}")
    raw = engine.raw_connection()  # outside any transaction: db.engine begins one on every SQLAlchemy use
    try:
        row = raw.driver_connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    except sqlite3.Error as err:
        raise LedgerError(f"cannot checkpoint the ledger: {err}") from err
    finally:
        raw.close()
    return int(row[0]), int(row[1]), int(row[2])


def backup(engine: Engine, where: str, target: Path) -> Path:
    """Write the whole ledger to ``target`` as one self-contained SQLite file (owner-only), atomically."""
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        raise LedgerError(f"cannot write the backup: the folder {target.parent} does not exist")
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    raw = engine.raw_connection()
    try:
        dest = sqlite3.connect(partial)
        try:
            raw.driver_connection.backup(dest)  # a consistent snapshot, even while others write
            dest.execute("PRAGMA journal_mode = DELETE")  # the copy needs no -wal beside it
        finally:
            dest.close()
        os.replace(partial, target)
    except (sqlite3.Error, OSError) as err:
        partial.unlink(missing_ok=True)
        raise LedgerError(f"cannot back up the ledger {where} to {target}: {err}") from err
    finally:
        raw.close()
    logger.info("backed up ledger %s to %s", where, target)
    return target


def header_problems(path: Path) -> list[str]:
    """What is wrong with the first 100 bytes of a SQLite file (empty list: a sound header)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
    except OSError as err:
        return [f"cannot read {path}: {err.strerror}"]
    if not head:
        return []
    if len(head) < HEADER_BYTES or head[:16] != SQLITE_MAGIC:
        return [f"{path} does not start with the SQLite header: the file is damaged or is not a ledger"]
    problems = []
    page_size = int.from_bytes(head[16:18], "big")
    if not (page_size == 1 or (512 <= page_size <= 32768 and page_size & (page_size - 1) == 0)):
        problems.append(f"header byte 16-17 (page size {page_size}) is invalid")
    for offset, name in ((18, "write version"), (19, "read version")):
        if head[offset] not in (1, 2):  # 1 rollback journal, 2 WAL; anything else makes SQLite refuse writes
            problems.append(f"header byte {offset} ({name} {head[offset]}) is not 1 or 2")
    if tuple(head[21:24]) != (64, 32, 32):
        problems.append("header bytes 21-23 (payload fractions) are not 64, 32, 32")
    return [f"{path}: the file header is damaged: {p}" for p in problems]


def file_problems(path: Path) -> list[str]:
    """Damage found in a SQLite ledger file without the app: its header, then SQLite's ``integrity_check``."""
    if not path.exists():
        return [f"{path} does not exist"]
    problems = header_problems(path)
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.Error as err:
        return problems + [f"{path}: SQLite cannot read it ({err}): the file is damaged"]
    if rows != ["ok"]:
        problems += [f"{path}: sqlite integrity_check: {r}" for r in rows]
    return problems


def refuse_missing_tables(engine: Engine | None, where: str, path: Path | None, new: bool) -> None:
    """Refuse to start on an existing ledger file that holds no tables, instead of silently starting afresh.

    Such a file is what remains when the ``-wal`` file that held every change was lost, or when the
    file was emptied. Only a file that did not exist before this process opened it is new. Called
    with ``engine=None`` before the first connection (which would write a header into an empty file).
    """
    if new or path is None:
        return
    if engine is None:
        size = path.stat().st_size
        if size:
            return
    else:
        if set(inspect(engine).get_table_names()):
            return
        with engine.connect() as conn:
            size = conn.execute(text("PRAGMA page_count")).scalar_one() * conn.execute(text("PRAGMA page_size")).scalar_one()
    raise LedgerError(
        f"the ledger {where} exists but holds no tables ({size} bytes): its edits are missing. This happens when "
        f"the '{where}-wal' file that held them was lost, or the file was emptied or replaced. Nothing was changed. "
        "Restore the ledger from a backup (app.py backup PATH writes one), put the missing -wal file back beside it, "
        "or, to start a new empty ledger on purpose, move this file away or start with another --db path."
    )
