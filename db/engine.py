"""Where the ledger lives: URL resolution, a private SQLite file, and the engine's connection settings.

SQLite connections run in WAL mode with foreign keys on and a busy timeout. We issue
``BEGIN`` ourselves (pysqlite would defer it to the first write): writers take the write lock
up front with ``BEGIN IMMEDIATE``, so a read-modify-write such as "append at the next
position" cannot interleave with another process; readers use a plain deferred ``BEGIN``.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError

from db.durability import header_problems
from db.schema import LedgerError

logger = logging.getLogger(__name__)

CREATE_WAIT_S = 10.0  # how long an opener waits for another process creating the same new ledger
JUST_CREATED_S = 1.0  # how long an empty ledger file may wait for its creator to lock it
BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another process's lock
# Checkpoint after every commit that leaves a page in the WAL (SQLite's default waits for 1000): the
# database file then holds every committed change, and a lost -wal file loses nothing (db.durability).
AUTOCHECKPOINT_PAGES = 1
READ_ONLY = "ledger_read_only"  # execution option: begin a deferred (reading) transaction


def to_url(path_or_url: str | Path) -> str:
    """A database URL as given, or a filesystem path turned into a ``sqlite:///`` URL."""
    if isinstance(path_or_url, str) and "://" in path_or_url:
        try:
            make_url(path_or_url)
        except ArgumentError as err:
            raise LedgerError(f"{path_or_url!r} is not a valid database URL: {err}") from err
        return path_or_url
    path = Path(path_or_url).expanduser().absolute()
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def resolve_url(flag: str | None, default_path: Path) -> str:
    """The ledger's URL: the ``--db`` flag wins, then ``$DATABASE_URL``, then ``default_path``."""
    if flag is not None:
        if not flag.strip():
            raise LedgerError("--db is empty; give a file path or a database URL such as sqlite:///edits.db")
        return to_url(flag.strip())
    env = os.environ.get("DATABASE_URL", "").strip()
    if env:
        return to_url(env)
    return to_url(default_path)


def describe(url: URL) -> str:
    """How to name the ledger in messages: its file for SQLite, else the URL without password."""
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory and ``file:`` URI databases."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):
        return None
    return Path(url.database)


def _make_folders(path: Path) -> None:
    """The missing folders above ``path``, readable by the owner only."""
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        for folder in reversed(missing):
            folder.mkdir(mode=0o700)
    except FileExistsError:  # another process made it meanwhile
        pass
    except OSError as err:
        raise LedgerError(f"cannot create the folder for the ledger {path}: {err.strerror}; choose another --db path") from err


def create_private_file(path: Path) -> None:
    """Create ``path`` (and missing folders) readable by the owner only, if it does not exist yet.

    SQLite gives its ``-wal`` and ``-shm`` files the database file's permissions, so creating
    the file ourselves first keeps all three private.
    """
    _make_folders(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            logger.warning("ledger %s is readable by other users (mode %o); run: chmod 600 %s", path, mode, path)
        return
    except OSError as err:
        raise LedgerError(f"cannot create the ledger file {path}: {err.strerror}; choose another --db path") from err
    os.close(fd)
    logger.info("created ledger file %s (mode 600)", path)


@contextmanager
def creating(path: Path, wait_s: float = CREATE_WAIT_S) -> Iterator[bool]:
    """Yield whether this process creates the SQLite file ``path``; its creator holds a lock on it meanwhile.

    Several instances may open one new ledger at the same moment. The one that creates the file
    holds an exclusive ``flock`` on it while it builds the schema; another waits for that lock (at
    most ``wait_s``; no wait at all for a file nobody is creating) before it judges the file, so it
    never takes a ledger being created for one that lost its edits.
    """
    _make_folders(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except FileExistsError:
        _wait_for_creator(path, wait_s)  # at once unless another process is creating it right now
        yield False
        return
    except OSError as err:
        raise LedgerError(f"cannot create the ledger file {path}: {err.strerror}; choose another --db path") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        logger.info("created ledger file %s (mode 600)", path)
        yield True
    finally:
        os.close(fd)  # releases the lock


def _wait_for_creator(path: Path, wait_s: float) -> None:
    """Return once no process holds the creator's lock on ``path`` (at most ``wait_s``).

    A file still empty right after that may have been created an instant ago, before its creator
    took the lock: it is given ``JUST_CREATED_S`` more to be locked or filled.
    """
    deadline, young_until = time.monotonic() + wait_s, time.monotonic() + JUST_CREATED_S
    with open(path, "rb") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                if path.stat().st_size or time.monotonic() > young_until:
                    return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return
            time.sleep(0.02)


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # no implicit BEGIN from pysqlite: see _on_begin
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}")
    finally:
        cursor.close()


# What SQLite says when the file, not the request, is the problem; each becomes a LedgerError that
# names the ledger and what to do. The transaction was rolled back: nothing was written.
_SQLITE_FAULTS = (
    ("database is locked", "the ledger {where} is locked by another process (waited {ms} ms); try again when it "
                           "has finished, or stop the other app using this --db"),
    ("readonly database", "the ledger {where} is read-only (file permissions), so nothing was changed; make it "
                          "writable (chmod 600) or start with --read-only"),
    ("file is not a database", "cannot open ledger {where}: it is not a SQLite database (SQLite says: file is not "
                               "a database). If --db names the right file, the ledger is damaged: run app.py verify "
                               "--integrity and restore it from a backup; otherwise check the --db path"),
    ("malformed", "the ledger {where} is damaged (SQLite says: database disk image is malformed), so nothing was "
                  "changed; run app.py verify --integrity, and restore it from a backup"),
    ("database or disk is full", "the disk holding the ledger {where} is full, so nothing was changed; "
                                 "free some space"),
    ("disk i/o error", "the ledger {where} could not be read or written (disk I/O error); the operation was "
                       "not recorded"),
)


def _on_error(context: Any) -> None:
    """Turn a SQLite fault of the file (locked, read-only, full, I/O) into a LedgerError a user can act on."""
    text = str(context.original_exception).lower()
    for needle, message in _SQLITE_FAULTS:
        if needle in text:
            where = describe(context.engine.url) if context.engine is not None else "file"
            damage = _read_only_cause(context.engine.url) if needle == "readonly database" else None
            raise LedgerError(damage or message.format(where=where, ms=BUSY_TIMEOUT_MS)) from context.original_exception


def _read_only_cause(url: URL) -> str | None:
    """When SQLite says read-only but the file is writable, the cause is damage, not permissions: say so."""
    path = sqlite_file(url)
    effective = os.access in os.supports_effective_ids
    if path is None or not all(os.access(p, os.W_OK, effective_ids=effective) for p in (path, path.parent)):
        return None
    problems = header_problems(path)
    if not problems:
        return None
    return (f"the ledger {path} is damaged, not read-only: its permissions allow writing, but {problems[0]}, so "
            "SQLite opens it read-only and nothing was changed. Do not chmod it: run app.py verify --integrity "
            "and restore the ledger from a backup (app.py backup writes one).")  # fmt: skip


def _on_begin(conn: Any) -> None:
    mode = "DEFERRED" if conn.get_execution_options().get(READ_ONLY) else "IMMEDIATE"
    conn.exec_driver_sql(f"BEGIN {mode}")


def create_ledger_engine(url: URL) -> Engine:
    """An engine for ``url``; for a SQLite file, the file is created private before first use."""
    if url.get_backend_name() != "sqlite":
        try:
            return create_engine(url, pool_pre_ping=True)
        except (ImportError, ArgumentError) as err:
            raise LedgerError(
                f"cannot use database {describe(url)}: {err}. Install its driver, or give a file path for SQLite."
            ) from err
    path = sqlite_file(url)
    if path is not None:
        create_private_file(path)
    engine = create_engine(url)
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    event.listen(engine, "handle_error", _on_error)
    return engine
