"""Alembic migrations: a ledger written before Alembic (schema version 1) upgrades in place and keeps its edits."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, insert, select, text

from db import Ledger, LedgerError
from db.migrate import alembic_config, head
from tests.test_db_ledger import FP, apply_new

V1_DUMP = Path(__file__).parent / "fixtures" / "ledger_v1.sql"  # sqlite3 .dump of a ledger made by the v1 code


def v1_sqlite(path: Path) -> str:
    with sqlite3.connect(path) as con:
        con.executescript(V1_DUMP.read_text())
    return str(path)


def v1_postgres(url: str, tmp_path: Path) -> str:
    """The same v1 ledger on PostgreSQL: the v1 DDL (revision 0001), no migration record, the fixture's rows."""
    from alembic import command

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.execute(text("DROP TABLE alembic_version"))
    source = create_engine(f"sqlite:///{v1_sqlite(tmp_path / 'v1.db')}")
    tables = MetaData()
    tables.reflect(source)
    with source.connect() as src, engine.begin() as dst:
        dst.execute(text("DELETE FROM meta"))
        for name in ("edits", "events", "meta"):
            rows = [dict(r._mapping) for r in src.execute(select(tables.tables[name]))]
            links = {r["id"]: r.pop("superseded_by") for r in rows} if name == "edits" else {}
            dst.execute(insert(tables.tables[name]), [{**r, "superseded_by": None} if links else r for r in rows])
            for edit_id, successor in links.items():  # after the rows they point to exist
                dst.execute(text("UPDATE edits SET superseded_by = :s WHERE id = :i"), {"s": successor, "i": edit_id})
        dst.execute(text("SELECT setval('edits_id_seq', (SELECT max(id) FROM edits))"))
        dst.execute(text("SELECT setval('events_id_seq', (SELECT max(id) FROM events))"))
    source.dispose()
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def v1_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return v1_sqlite(tmp_path / "edits.db")
    return v1_postgres(request.getfixturevalue("pg_server").new_database(), tmp_path)


def test_v1_ledger_upgrades_in_place_and_keeps_its_edits(v1_ledger: str) -> None:
    with Ledger.open(v1_ledger, FP) as led:
        history = {r.id: r for r in led.history()}
        assert [r.id for r in led.applied()] == [3, 4] and [r.position for r in led.applied()] == [0, 1]
        assert {i: r.status for i, r in history.items()} == {
            1: "superseded", 2: "reverted", 3: "applied", 4: "applied", 5: "refused"}
        assert history[4].author == "alice" and history[4].note == "a note" and history[4].superseded_by is None
        assert history[1].superseded_by == 4
        assert history[4].probes[0]["expected"] == "Rome" and history[4].meta["hparams"] == {"v_lr": 0.5, "layers": [3]}
        assert history[5].refusal_reason == "too weak" and history[5].factors is None
        assert all(r.batch_id is None and r.batch_size is None for r in history.values())  # 0003: no batch yet
        assert led.integrity_check() == []
        kinds = [e.kind for e in led.events()]
        assert kinds.count("applied") == 4 and "superseded" in kinds and "reverted" in kinds
        new_id = apply_new(led, 9)  # writes still work: ids continue after the old ones
        assert new_id == 6 and led.get(new_id).position == 2
        assert led.revision() > 0
        with led._engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
            assert conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar() == "2"
    with Ledger.open(v1_ledger, FP) as led:  # opening again migrates nothing and changes nothing
        assert [r.id for r in led.applied()] == [3, 4, 6]


def test_postgres_json_columns_are_jsonb(pg_server) -> None:  # type: ignore[no-untyped-def]
    with Ledger.open(pg_server.new_database(), FP) as led:
        apply_new(led, 0)
        with led._engine.connect() as conn:
            kinds = conn.execute(text("SELECT data_type FROM information_schema.columns WHERE table_name = 'edits' "
                                      "AND column_name LIKE '%_json' ORDER BY column_name")).scalars().all()
            layers = conn.execute(text("SELECT meta_json -> 'hparams' -> 'layers' ->> 0 FROM edits")).scalar()
    assert kinds == ["jsonb"] * 3 and layers == "3"


def test_unknown_v1_versions_are_refused(tmp_path: Path) -> None:
    path = v1_sqlite(tmp_path / "edits.db")
    with sqlite3.connect(path) as con:
        con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match=r"schema version '0' but no migration record.*--db"):
        Ledger.open(path, FP)
    with sqlite3.connect(path) as con:  # refused before anything was written
        assert con.execute("SELECT name FROM sqlite_master WHERE name = 'alembic_version'").fetchone() is None


def test_instances_opening_a_new_ledger_together_create_it_once(ledger_url: str) -> None:
    opened: list[object] = []

    def open_one() -> None:
        try:
            Ledger.open(ledger_url, FP).close()
            opened.append(True)
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            opened.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opened == [True] * 4
    with Ledger.open(ledger_url, FP) as led, led._engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM meta WHERE key = 'revision'")).scalar() == 1


def test_the_models_match_the_migrations(pg_server) -> None:  # type: ignore[no-untyped-def]
    """A column added to db/schema.py without a migration (or the reverse) shows up here."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.schema import Base

    with Ledger.open(pg_server.new_database(), FP) as led, led._engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
