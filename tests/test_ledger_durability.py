"""The ledger file is the ledger: every commit reaches it, a file without its tables is never silently
recreated, damage is named for what it is, and a damaged edit can be left out on purpose."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from chat_app.runtime import Settings, check_not_emptied, closing_on_stop, remember
from chat_app.service import EditService
from chat_app.startup import replay
from chat_app.transfer import export_file
from db import Ledger, LedgerError, read_export
from editing import EditRequest
from tests.reliability_helpers import cli_runner, fast_service, one_thread, tiny_app_on_disk

FINGERPRINT = "ab" * 32
A = EditRequest("The Eiffel tower", "Located in {}", "rome")
B = EditRequest("Big Ben", "{} is in", "paris")
C = EditRequest("The Colosseum", "Located in {}", "london")


def refused_meta(subject: str) -> dict[str, Any]:
    return {"subject": subject, "relation": "{} is in", "target": "rome", "layer": 1, "param_name": "",
            "fingerprint": FINGERPRINT, "hparams": {}}  # fmt: skip


def fill(ledger: Ledger, n: int) -> None:
    for i in range(n):
        ledger.record_refused(refused_meta(f"subject {i}"), "for the test")


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ----- durable on every stop ---------------------------------------------------------------------
def test_every_commit_reaches_the_database_file(tmp_path: Path) -> None:
    """While the ledger is open, the .db file alone (as a copy or a backup of it would be) holds every edit."""
    with Ledger.open(tmp_path / "ledger.db", FINGERPRINT) as ledger:
        fill(ledger, 3)
        shutil.copy(tmp_path / "ledger.db", tmp_path / "copy.db")  # the -wal left behind
        with Ledger.open(tmp_path / "copy.db") as copy:
            assert [r.subject for r in copy.history()] == ["subject 2", "subject 1", "subject 0"]


def test_close_leaves_one_file_and_backup_writes_one_consistent_file(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger.db", FINGERPRINT)
    fill(ledger, 2)
    target = ledger.backup(tmp_path / "backup.db")  # while open
    fill(ledger, 1)
    ledger.close()
    assert not (tmp_path / "ledger.db-wal").exists() or (tmp_path / "ledger.db-wal").stat().st_size == 0
    assert target.stat().st_mode & 0o077 == 0 and not (tmp_path / "backup.db-wal").exists()
    with sqlite3.connect(target) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM edits").fetchone() == (2,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    with Ledger.open(target) as restored:
        assert len(restored.history()) == 2 and restored.model_fingerprint == FINGERPRINT


@pytest.mark.parametrize("how", ["return", "error", "SIGINT", "SIGTERM"])
def test_every_way_out_checkpoints_and_closes_the_ledger(tmp_path: Path, how: str) -> None:
    ledger = Ledger.open(tmp_path / "ledger.db", FINGERPRINT)
    fill(ledger, 2)
    wal = tmp_path / "ledger.db-wal"
    assert wal.stat().st_size > 0
    before = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(RuntimeError), closing_on_stop(SimpleNamespace(ledger=ledger)):  # type: ignore[arg-type]
        if how == "error":
            raise RuntimeError("a crash in the app")
        if how != "return":
            os.kill(os.getpid(), getattr(signal, how))  # SIGTERM acts as Ctrl-C inside the block
            time.sleep(5)  # interrupted long before this ends
    assert not wal.exists() or wal.stat().st_size == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    wal.unlink(missing_ok=True)
    with Ledger.open(tmp_path / "ledger.db") as reopened:
        assert len(reopened.history()) == 2


# ----- never recreate silently -------------------------------------------------------------------
def test_a_ledger_file_that_lost_its_wal_is_refused_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("db.engine.AUTOCHECKPOINT_PAGES", 10_000)  # as before: changes stay in the -wal
    with Ledger.open(tmp_path / "ledger.db", FINGERPRINT) as ledger:
        fill(ledger, 2)
        shutil.copy(tmp_path / "ledger.db", tmp_path / "lost-wal.db")
    (tmp_path / "empty.db").write_bytes(b"")  # emptied (not created by us)
    for name in ("lost-wal.db", "empty.db"):
        before = (tmp_path / name).read_bytes()
        with pytest.raises(LedgerError, match="exists but holds no tables.*-wal.*backup.*another --db"):
            Ledger.open(tmp_path / name)
        assert (tmp_path / name).read_bytes() == before  # nothing written
    with Ledger.open(tmp_path / "new" / "ledger.db") as new:  # a path that did not exist: a new, empty ledger
        assert new.history() == []


def test_a_data_folder_ledger_that_suddenly_holds_nothing_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROME_CHAT_DATA", raising=False)
    settings = Settings(model=str(tmp_path / "tiny"), data_dir=tmp_path / "data")
    path = tmp_path / "data" / "tiny.ledger.db"
    with Ledger.open(path, FINGERPRINT) as ledger:
        check_not_emptied(ledger, settings)  # first use: nothing to compare with
        fill(ledger, 2)
        remember(ledger, settings)  # as the app does when it stops
    for leftover in path.parent.glob("tiny.ledger.db*"):
        leftover.unlink()  # the ledger is gone; opening the path creates a new, empty one
    with Ledger.open(path, FINGERPRINT) as ledger:
        with pytest.raises(LedgerError, match=r"held edits up to #2 .* now holds no edits.*backup"):
            check_not_emptied(ledger, settings)
    elsewhere = Settings(model=str(tmp_path / "tiny"), db=str(path), data_dir=tmp_path / "other")
    with Ledger.open(path, FINGERPRINT) as ledger:
        check_not_emptied(ledger, elsewhere)  # an explicit --db outside the data folder is not watched


# ----- honest damage reports ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_app_on_disk(tmp_path_factory.mktemp("durability"), {"ledger.db": [A]})


@pytest.fixture
def run(disk: dict[str, Path], capsys: Any) -> Any:
    return cli_runner(disk, capsys)


def test_verify_integrity_reports_a_damaged_header_and_the_write_names_damage_not_chmod(
    run: Any, disk: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    db = tmp_path / "ledger.db"
    shutil.copy(disk["ledger.db"], db)
    assert run(db, "verify", "--integrity", "--json")[0] in (0, 1)  # sound file: no integrity problem
    flip(db, 18)  # the file format write version: SQLite then opens the file read-only
    code, out, _ = run(db, "verify", "--integrity")
    assert code == 1 and "header is damaged" in out and "byte 18" in out
    code, out, _ = run(db, "verify", "--integrity", "--json")
    assert code == 1 and "byte 18" in out and '"integrity_problems"' in out
    code, _, err = run(db, "edit", "--subject", B.subject, "--relation", B.relation, "--target", B.target)
    assert code == 2 and "damaged, not read-only" in err and "Do not chmod" in err and "backup" in err


def test_verify_integrity_reports_a_damaged_page(run: Any, disk: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(disk["ledger.db"], db)
    page_size = int.from_bytes(db.read_bytes()[16:18], "big")
    for page in range(1, db.stat().st_size // page_size):  # scramble the b-tree header of every page after the first
        flip(db, page * page_size)
    code, out, _ = run(db, "verify", "--integrity", "--json")
    assert code == 1 and ("integrity_check" in out or "damaged" in out), out


def test_verify_integrity_names_an_edit_with_damaged_factors(run: Any, disk: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(disk["ledger.db"], db)
    with Ledger.open(db) as ledger:
        factors = ledger.get(1).factors
    flip(db, db.read_bytes().index(factors[:64]) + 10)
    code, out, _ = run(db, "verify", "--integrity", "--json")
    report = json.loads(out)
    assert code == 1 and any("edit #1: factors do not match" in p for p in report["integrity_problems"])
    assert "--skip-edit" in report["advice"]


@pytest.fixture
def three(tmp_path: Path) -> Iterator[Path]:
    with one_thread():
        service = fast_service(tmp_path / "ledger.db")
        for request in (A, B, C):
            service.apply(request)
        service.ledger.close()
    yield tmp_path / "ledger.db"


def test_a_damaged_factor_names_the_edit_and_skip_edit_starts_without_it(three: Path, tmp_path: Path) -> None:
    with Ledger.open(three) as ledger:
        factors = ledger.get(2).factors
    data = three.read_bytes()
    at = data.index(factors[:64])  # the stored bytes of edit #2, in the file itself
    flip(three, at + 10)
    with one_thread(), pytest.raises(LedgerError, match=r"edit #2 .*cannot be replayed.*checksum.*--skip-edit 2"):
        fast_service(three)
    with Ledger.open(three) as ledger:
        assert [r.id for r in ledger.applied()] == [1, 2, 3]  # nothing changed until the user chooses


def test_skip_edit_quarantines_it_records_an_event_and_replays_the_others(three: Path, tmp_path: Path) -> None:
    with Ledger.open(three) as ledger:
        factors = ledger.get(2).factors
    flip(three, three.read_bytes().index(factors[:64]) + 10)
    with one_thread():
        service = fast_service(three.with_name("scratch.db"))  # a model and editor to replay with
        service.ledger.close()
        service.ledger = Ledger.open(three)
        report = replay(service, skip=(2,))
    assert report.replayed == 2 and [r.id for r in service.ledger.applied()] == [1, 3]
    assert service.ledger.get(2).status == "failed" and service.active_count == 2
    assert any(e.kind == "failed" and "--skip-edit" in (e.detail or "") for e in service.events(2))
    assert service.integrity_problems() == []
    export_file(service, tmp_path / "others.zip")
    assert [e.meta["subject"] for e in read_export(tmp_path / "others.zip").edits] == [A.subject, C.subject]
    replay(service, skip=(2,))  # the same flag at the next start: nothing more to do
    service.ledger.close()


# ----- the command line: backup, --skip-edit, --force, "applied, not holding" ----------------------
def test_cli_backup_skip_edit_and_not_holding(run: Any, disk: dict[str, Path], tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    shutil.copy(disk["ledger.db"], db)
    code, out, _ = run(db, "backup", str(tmp_path / "copy.db"))
    assert code == 0 and "backed up" in out
    with Ledger.open(tmp_path / "copy.db") as copy, Ledger.open(db) as ledger:
        assert [r.id for r in copy.history()] == [r.id for r in ledger.history()] == [1]
    with sqlite3.connect(db) as conn:  # the stored check of its own prompt did not hold
        (probes,) = conn.execute("SELECT probes_json FROM edits WHERE id = 1").fetchone()
        probes = [{**p, "holds": False} if p["kind"] == "edited" else p for p in json.loads(probes)]
        conn.execute("UPDATE edits SET probes_json = ? WHERE id = 1", (json.dumps(probes),))
    code, out, _ = run(db, "history")
    assert code == 0 and "applied, not holding" in out
    assert json.loads(run(db, "history", "--json")[1])[0]["holding"] is False
    code, out, _ = run(db, "--skip-edit", "1", "history", "--json")
    assert code == 0 and json.loads(out)[0]["status"] == "failed"


def test_cli_edit_force_reaches_the_service(run: Any, disk: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    seen: list[Any] = []
    real = EditService.apply

    def spy(self: EditService, request: EditRequest, **kwargs: Any) -> Any:
        seen.append((kwargs.get("force"), kwargs.get("allow_outlier")))
        return real(self, request, **kwargs)

    monkeypatch.setattr(EditService, "apply", spy)
    db = tmp_path / "ledger.db"
    shutil.copy(disk["ledger.db"], db)
    fact = ["edit", "--subject", B.subject, "--relation", B.relation, "--target", B.target]
    run(db, *fact)  # may be refused once the service refuses an edit whose own prompt does not hold
    assert run(db, *fact, "--force")[0] == 0
    assert seen == [(False, False), (True, True)]
