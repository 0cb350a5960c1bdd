"""Faults: SIGKILL mid-operation, a locked or read-only ledger, a full disk, a corrupted statistics cache,
and the numerical guard.

The kill tests run the app's service in subprocesses on a tiny model saved to disk
(``tests/fault_worker.py``), kill them at a chosen point, then restart from the ledger.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from chat_app.runtime import Settings, build_service
from chat_app.service import EditService
from chat_app.transfer import export_file, import_file
from db import LedgerError
from editing import EditRequest, RankOneEdit
from editing import editor as editing_editor
from tests.export_files import FullDisk, rewrite, scale_factors
from tests.reliability_helpers import ROOT, app_env, digest, fast_service, one_thread, read_only_file
from tests.reliability_helpers import cli_runner, in_process_app, tiny_app_on_disk, wait_for_json
from tests.tiny import tiny_llama

A = EditRequest("The Eiffel tower", "Located in {}", "rome")
B = EditRequest("The Colosseum", "Located in {}", "london")
C = EditRequest("Big Ben", "{} is in", "paris")
D = EditRequest("Apple", "{} was developed by", "google")
A2 = EditRequest(A.subject, A.relation, "paris")  # supersedes A
WORKER_TIMEOUT_S = 240  # start-up of a fresh Python with torch on a busy two-core machine


@dataclass(frozen=True)
class Kill:
    op: str  # the operation killed
    point: str  # where (tests/fault_worker.py)
    expect: str  # the state a restart must find: "before" or "after"
    applied: tuple[int, ...]  # the ledger's applied sequence after the restart
    statuses: tuple[tuple[int, str], ...]  # other rows' statuses after the restart
    rows: int  # rows in the ledger after the restart


# Base ledger: #1 A, #2 B applied. The export holds one edit, C (it becomes #3 when imported).
KILLS = {
    "edit, inside the commit": Kill("edit", "commit:mark_applied", "before", (1, 2), ((3, "failed"),), 3),
    "edit, after the commit": Kill("edit", "after:mark_applied", "after", (2, 3), ((1, "superseded"),), 3),
    "revert, inside the commit": Kill("revert", "commit:mark_reverted", "before", (1, 2), (), 2),
    "revert, after the commit": Kill("revert", "after:mark_reverted", "after", (2,), ((1, "reverted"),), 2),
    "import, inside the commit": Kill("import", "commit:record_imported", "before", (1, 2), (), 2),
    "import, after the commit": Kill("import", "after:record_imported", "after", (1, 2, 3), (), 3),
}


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model on disk, its statistics cached, a base ledger (A, B applied) and an export of C."""
    return tiny_app_on_disk(tmp_path_factory.mktemp("faults"), {"base.db": [A, B], "other.db": [C]},
                            {"c.zip": "other.db"})  # fmt: skip


def _worker_args(kill: Kill, disk: dict[str, Path]) -> list[str]:
    if kill.op == "edit":
        return ["edit", A2.subject, A2.relation, A2.target]
    if kill.op == "revert":
        return ["revert", "1"]
    return ["import", str(disk["c.zip"])]


@pytest.fixture(scope="module")
def killed(disk: dict[str, Path]) -> dict[str, Path | Exception]:
    """Every scenario in its own process (forked from one that imported everything once), killed at its point."""
    spec = []
    for name, kill in KILLS.items():
        folder = disk["root"] / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        shutil.copy(disk["base.db"], folder / "ledger.db")
        argv = [str(disk["model"]), str(folder / "ledger.db"), str(folder), *_worker_args(kill, disk)]
        spec.append({"argv": argv, "pause_at": kill.point})
    (disk["root"] / "spec.json").write_text(json.dumps(spec))
    results: dict[str, Path | Exception] = {}
    with open(disk["root"] / "workers.log", "wb") as log:
        parent = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_worker.py"), "--each",
                                   str(disk["root"] / "spec.json")], env=app_env(disk["cache"]), stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        try:
            for name, entry in zip(KILLS, spec):
                folder = Path(entry["argv"][2])
                try:
                    paused = wait_for_json(folder / "paused.json", parent, WORKER_TIMEOUT_S, folder / "exit.json")
                    results[name] = folder
                except (RuntimeError, TimeoutError) as err:
                    results[name] = RuntimeError(f"{err}:\n{(disk['root'] / 'workers.log').read_text()[-3000:]}")
                    continue
                os.kill(paused["pid"], signal.SIGKILL)
            parent.wait(WORKER_TIMEOUT_S)  # it exits once every child has ended
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    for name, entry in zip(KILLS, spec):
        ended = Path(entry["argv"][2]) / "exit.json"
        if isinstance(results[name], Path) and json.loads(ended.read_text())["status"] != signal.SIGKILL:
            results[name] = RuntimeError(f"{name}: the worker was not ended by SIGKILL: {ended.read_text()}")
    return results


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_leaves_the_state_before_or_after_never_a_mix(name: str, killed: dict[str, Any],
                                                              disk: dict[str, Path], capsys: Any) -> None:  # fmt: skip
    if isinstance(killed[name], Exception):
        raise killed[name]
    folder, kill = killed[name], KILLS[name]
    before = json.loads((folder / "before.json").read_text())["weights"]
    at_kill = json.loads((folder / "paused.json").read_text())["weights"]
    assert at_kill != before  # the live weights had already changed when the process died
    code, out, _ = cli_runner(disk, capsys)(folder / "ledger.db", "verify", "--integrity", "--json")  # restart
    assert code in (0, 1) and json.loads(out)["integrity_problems"] == []  # 1: a tiny model's probes may not hold
    with in_process_app(disk["cache"]), one_thread():
        restarted, startup = build_service(Settings(model=str(disk["model"]), db=str(folder / "ledger.db")))
    assert digest(restarted.model) == (before if kill.expect == "before" else at_kill)
    assert tuple(r.id for r in restarted.ledger.applied()) == kill.applied
    assert all(restarted.record(i).status == s for i, s in kill.statuses)
    assert len(restarted.ledger.history()) == kill.rows  # an import is all or nothing
    assert not restarted.ledger.pending() and not startup.mismatches


# ----- the ledger's file: locked, read-only -------------------------------------------------------
@pytest.fixture
def fast(tmp_path: Path) -> Iterator[EditService]:
    with one_thread():
        yield fast_service(tmp_path / "ledger.db")


def _unchanged(service: EditService, weights: dict[str, str], rows: list[Any]) -> None:
    assert digest(service.model) == weights
    assert service.ledger.history() == rows and service.ledger.integrity_check() == []
    assert service.integrity_problems() == []


def test_locked_ledger_gives_a_clear_error_and_changes_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr("db.engine.BUSY_TIMEOUT_MS", 200)  # read when a connection opens
    with one_thread():
        service = fast_service(tmp_path / "ledger.db")
        first = service.apply(A).edit_id
        weights, rows = digest(service.model), service.ledger.history()
        holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
        try:
            with pytest.raises(LedgerError, match="locked by another"):
                service.apply(B)
            with pytest.raises(LedgerError, match="locked by another"):
                service.revert(first)  # fails after the weights changed: they are rebuilt from the ledger
            assert digest(service.model) == weights
        finally:
            holder.rollback()
            holder.close()
        _unchanged(service, weights, rows)
        assert service.apply(B).record.status == "applied"  # the lock released, work goes on


def test_read_only_ledger_file_serves_history_and_refuses_changes_clearly() -> None:
    folder = Path(tempfile.mkdtemp(prefix="rome-chat-ro-"))  # not under pytest's root-only folder (see read_only_file)
    try:
        with one_thread():
            other = fast_service(folder / "other.db")
            other.apply(D)
            export_file(other, folder / "edits.zip")
            os.chmod(folder / "edits.zip", 0o644)  # readable by the user of read_only_file
            service = fast_service(folder / "ledger.db")
            first, second = service.apply(A).edit_id, service.apply(B).edit_id
            service.revert(first)
            service.ledger.close()
            with read_only_file(folder / "ledger.db"):
                bytes_before = (folder / "ledger.db").read_bytes()
                service = fast_service(folder / "ledger.db")  # start-up replays a ledger it cannot write
                weights, rows = digest(service.model), service.ledger.history()
                assert [r.id for r in service.ledger.applied()] == [second]
                for change in (lambda: service.apply(C), lambda: service.revert(second), lambda: service.reapply(first),
                               lambda: import_file(service, folder / "edits.zip")):  # fmt: skip
                    with pytest.raises(LedgerError, match="read-only"):
                        change()
                    _unchanged(service, weights, rows)
                service.ledger.close()
                assert (folder / "ledger.db").read_bytes() == bytes_before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----- a full disk, a corrupted statistics cache -------------------------------------------------
def test_full_disk_on_export_keeps_the_old_file_and_the_ledger(disk: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    run, db, target = cli_runner(disk, capsys), tmp_path / "ledger.db", tmp_path / "edits.zip"
    shutil.copy(disk["base.db"], db)
    assert run(db, "export", str(target))[0] == 0
    old = target.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr("db.transfer.os.fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), room=2048))
    code, _, err = run(db, "export", str(target))
    assert code == 2 and "could not write the export" in err and "No space left" in err
    assert "free some disk space" in err
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir() if "zip" in p.name] == ["edits.zip"]
    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
    monkeypatch.undo()
    with in_process_app(disk["cache"]), one_thread():
        service, _ = build_service(Settings(model=str(disk["model"]), db=str(db)))
    assert [r.id for r in service.ledger.applied()] == [1, 2] and service.ledger.integrity_check() == []


def test_corrupted_statistics_cache_is_reported_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    from editing import stats
    from tests.tiny import CORPUS, tiny_tokenizer

    monkeypatch.setenv("ROME_CHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(stats, "read_corpus", lambda corpus=None: CORPUS)
    model, tok = tiny_llama(), tiny_tokenizer()
    fingerprint = "ab" * 32

    def cov() -> torch.Tensor:
        return stats.second_moment(model, tok, fingerprint, 1, 10)

    with one_thread():
        good = cov()
        (path,) = (tmp_path / "stats").iterdir()
        saved = path.read_bytes()
        nan = {"cov": torch.full_like(good, float("nan")), "n_tokens": 1, "n_texts": 1}
        for damage in (b"garbage, not a tensor file", saved[: len(saved) // 2], nan):
            if isinstance(damage, dict):
                torch.save(damage, path)
            else:
                path.write_bytes(damage)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="editing.stats"):
                assert torch.equal(cov(), good)  # rebuilt, not trusted and not a crash
            assert any(path.name in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
            assert torch.equal(torch.load(path, weights_only=True)["cov"], good)  # and the file is whole again


# ----- the numerical guard ----------------------------------------------------------------------
def _scaled(edit: RankOneEdit, value: float, key: float = 1.0) -> RankOneEdit:
    return dataclasses.replace(edit, value_dir=edit.value_dir * value, key_dir=edit.key_dir * key)


def _computing(service: EditService, monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """From now on the editor's compute returns ``change(edit)`` (or raises what ``change`` raises)."""
    real = service.editor.compute
    monkeypatch.setattr(service.editor, "compute",
                        lambda request, progress=None, **hp: change(real(request, progress, **hp)))  # fmt: skip


def _refused_last(service: EditService, weights: dict[str, str], applied: list[int], reason: str) -> Any:
    record = service.ledger.history()[0]  # newest first
    assert record.status == "refused" and reason in (record.refusal_reason or "")
    assert [e.kind for e in service.events(record.id)] == ["refused"]
    assert digest(service.model) == weights and [r.id for r in service.ledger.applied()] == applied
    assert service.integrity_problems() == [] and service.ledger.integrity_check() == []
    return record


def test_outlier_update_is_refused_and_recorded_unless_overridden(fast: EditService,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    applied = [fast.apply(r).edit_id for r in (A, B, C)]
    weights = digest(fast.model)
    _computing(fast, monkeypatch, lambda edit: _scaled(edit, 1e3))
    with pytest.raises(ValueError, match=r"update norm .* is over 20× the median .* override"):
        fast.apply(D)
    record = _refused_last(fast, weights, applied, "update norm")
    assert record.factors is not None  # the refused update is kept for inspection
    forced = fast.apply(D, allow_outlier=True)
    assert forced.record.status == "applied" and digest(fast.model) != weights
    median = sorted(e.update_norm for e in fast.editor.applied[:3])[1]
    assert RankOneEdit.from_payload(forced.record.meta, forced.record.factors).update_norm > 20 * median


@pytest.mark.parametrize("fault", ["diverged", "non-finite factors", "overflowing update"])
def test_numerical_failure_is_refused_and_recorded(fast: EditService, monkeypatch: pytest.MonkeyPatch,
                                                   fault: str) -> None:  # fmt: skip
    weights = digest(fast.model)  # no edit applied yet: no median to compare with
    if fault == "diverged":
        def diverge(edit: RankOneEdit) -> RankOneEdit:
            raise FloatingPointError("value optimisation diverged at step 3 (loss nan)")

        _computing(fast, monkeypatch, diverge)
    elif fault == "non-finite factors":  # the editor's own check on the factors it computed
        real = editing_editor.rank_one_factors
        monkeypatch.setattr(editing_editor, "rank_one_factors",
                            lambda *args: (real(*args)[0] * float("inf"), real(*args)[1]))  # fmt: skip
    else:  # finite factors whose product overflows float32
        _computing(fast, monkeypatch, lambda edit: _scaled(edit, 1e20, 1e20))
    with pytest.raises(ValueError, match="edit refused: .*(diverged|non-finite)"):
        fast.apply(A)
    _refused_last(fast, weights, [], "diverged" if fault == "diverged" else "non-finite")
    assert all(torch.isfinite(p).all() for p in fast.model.parameters())


@pytest.mark.parametrize("scale", [1e3, 1e20])
def test_import_of_an_outlier_or_overflowing_update_is_refused(tmp_path: Path, scale: float) -> None:
    with one_thread():
        source = fast_service(tmp_path / "source.db")
        source.apply(D)
        export_file(source, tmp_path / "edits.zip")
        service = fast_service(tmp_path / "ledger.db")
        for request in (A, B, C):
            service.apply(request)
        weights, rows = digest(service.model), service.ledger.history()
        with pytest.raises(ValueError, match="import refused: .*(over 20×|non-finite)"):
            import_file(service, rewrite(tmp_path / "edits.zip", tmp_path / "scaled.zip", scale_factors(scale)))
        _unchanged(service, weights, rows)
