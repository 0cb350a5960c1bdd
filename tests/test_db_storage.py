"""Ledger storage: the file on disk, its settings, version and model checks, integrity, URLs."""
from __future__ import annotations

import os
import random
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db import Ledger, LedgerError, resolve_url
from tests.test_db_ledger import FP, OTHER_FP, apply_new, make_payload


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """A new ledger on SQLite and on PostgreSQL (tests/conftest.py)."""
    with Ledger.open(ledger_url, FP) as led:
        yield led


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edits.db"
    Ledger.open(path, FP).close()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(LedgerError, match=r"revision '9999'.*newer version.*--db"):
        Ledger.open(path, FP)


def test_model_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edits.db"
    with Ledger.open(path, FP) as led:
        assert led.model_fingerprint == FP
        with pytest.raises(LedgerError, match="another --db"):
            led.record_pending(*make_payload(fingerprint=OTHER_FP))
    with pytest.raises(LedgerError, match=f"{FP[:12]}.*{OTHER_FP[:12]}.*another --db path"):
        Ledger.open(path, OTHER_FP)
    with Ledger.open(path, FP) as led:  # the right model still opens it
        assert led.model_fingerprint == FP


def test_not_a_ledger_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger.open(path)


def test_file_is_owner_only_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "edits.db"
    old_umask = os.umask(0)  # so the modes below are ours, not the umask's
    try:
        with Ledger.open(path, FP) as led:
            apply_new(led, 0)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    finally:
        os.umask(old_umask)
    assert modes["edits.db"] == 0o600 and modes["edits.db-wal"] == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_foreign_keys_are_enforced(ledger: Ledger) -> None:
    if ledger.url.get_backend_name() == "sqlite":  # PostgreSQL always enforces them
        with ledger._engine.begin() as conn:
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    with pytest.raises(IntegrityError), ledger._engine.begin() as conn:
        conn.execute(text("INSERT INTO events (edit_id, at, kind) VALUES (42, '2026-01-01', 'applied')"))


def test_integrity_check_finds_tampering(tmp_path: Path) -> None:
    path = tmp_path / "edits.db"
    with Ledger.open(path, FP) as led:
        a, b = apply_new(led, 0), apply_new(led, 1)
        assert led.integrity_check() == []
    with sqlite3.connect(path) as con:  # foreign keys are off in a bare connection
        con.execute("UPDATE edits SET factors = ? WHERE id = ?", (b"\x00" * 40, a))
        con.execute("UPDATE edits SET position = 0 WHERE id = ?", (b,))
        con.execute("INSERT INTO events (edit_id, at, kind) VALUES (77, '2026-01-01 00:00:00', 'applied')")
    with Ledger.open(path, FP) as led:
        problems = "\n".join(led.integrity_check())
    assert f"edit #{a}: factors do not match their sha256" in problems
    assert f"position 0 is held by 2 applied edits: [{a}, {b}]" in problems
    assert "refers to missing edit #77" in problems


def test_concurrent_writers_keep_positions_dense(ledger_url: str) -> None:
    path = ledger_url
    Ledger.open(path, FP).close()

    def writer(offset: int) -> None:
        with Ledger.open(path, FP) as led:
            for i in range(8):
                apply_new(led, offset + i)

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Ledger.open(path, FP) as led:
        assert [r.position for r in led.applied()] == list(range(24))
        assert led.integrity_check() == []


def test_resolve_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "default.db"
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert resolve_url(None, default) == f"sqlite:///{default}"
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@host/db")
    assert resolve_url(None, default) == "postgresql://u:p@host/db"
    assert resolve_url(str(tmp_path / "flag.db"), default) == f"sqlite:///{tmp_path / 'flag.db'}"
    assert resolve_url("sqlite:///other.db", default) == "sqlite:///other.db"
    with pytest.raises(LedgerError, match="--db is empty"):
        resolve_url("  ", default)


def test_any_sqlalchemy_url_and_plain_paths(tmp_path: Path) -> None:
    with Ledger("sqlite://") as mem:  # in-memory: no file, same API
        edit_id = apply_new(mem, 0)
        assert mem.get(edit_id).position == 0 and mem.integrity_check() == []
    with Ledger(tmp_path / "plain.db") as led:
        assert led.url.drivername == "sqlite" and led.url.database == str(tmp_path / "plain.db")
    with pytest.raises(LedgerError, match="Install its driver"):
        Ledger("nosuchdb://host/ledger")


def test_concurrent_reverts_and_reapplies_keep_the_sequence_dense(ledger_url: str) -> None:
    """Writers that reorder the sequence from several connections (instances) are serialised by the database."""
    with Ledger.open(ledger_url, FP) as led:
        ids = [apply_new(led, i) for i in range(12)]

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        with Ledger.open(ledger_url, FP) as led:
            for _ in range(15):
                edit_id = rng.choice(ids)
                try:
                    if led.get(edit_id).status == "applied":
                        led.mark_reverted(edit_id)
                    else:
                        led.mark_reapplied(edit_id)
                except LedgerError:  # another writer changed it first
                    pass

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Ledger.open(ledger_url, FP) as led:
        assert led.integrity_check() == []
        assert [r.position for r in led.applied()] == list(range(len(led.applied())))
