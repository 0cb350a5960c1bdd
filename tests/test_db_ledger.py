"""Ledger: records round-trip, status transitions, positions, binding, file safety, integrity."""
from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db import Ledger, LedgerError, resolve_url

FP = hashlib.sha256(b"model A").hexdigest()
OTHER_FP = hashlib.sha256(b"model B").hexdigest()


def hexsum(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def make_payload(subject: str = "Eiffel Tower", target: str = "Rome", seed: int = 0,
                 fingerprint: str = FP) -> tuple[dict[str, Any], bytes]:
    """A payload shaped like the engine's: 4 value + 6 key float32 factors."""
    rng = random.Random(seed)
    factors = struct.pack("<10f", *(rng.uniform(-1, 1) for _ in range(10)))
    meta = {
        "format": "rome-chat/rank-one-edit/1", "subject": subject, "relation": "{} is located in the city of",
        "target": target, "layer": 3, "param_name": "transformer.h.3.mlp.c_proj.weight",
        "fingerprint": fingerprint, "hparams": {"v_lr": 0.5, "layers": [3]},
        "checksum_before": hexsum(f"before {seed}"), "checksum_after": hexsum(f"after {seed}"),
        "stats": {"update_norm": 1.25}, "value_shape": [4], "key_shape": [6], "dtype": "float32-le",
        "factors_sha256": hashlib.sha256(factors).hexdigest(),
    }
    return meta, factors


PROBES = [
    {"prompt": "The Eiffel Tower is in", "kind": "edited", "expected": "Rome", "before": "Paris", "after": "Rome",
     "holds": True},
    {"prompt": "The Louvre is in", "kind": "neighbour", "expected": "Paris", "before": "Paris", "after": "Paris",
     "holds": True},
]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    with Ledger.open(tmp_path / "edits.db", FP) as led:
        yield led


def apply_new(ledger: Ledger, seed: int, subject: str | None = None) -> int:
    meta, factors = make_payload(subject or f"Subject {seed}", f"Target {seed}", seed)
    edit_id = ledger.record_pending(meta, factors)
    ledger.mark_applied(edit_id, meta["checksum_after"])
    return edit_id


def test_record_round_trip(ledger: Ledger) -> None:
    meta, factors = make_payload()
    edit_id = ledger.record_pending(meta, factors, PROBES, note="why", author="ana", answer_before="Paris")
    rec = ledger.get(edit_id)
    assert (rec.status, rec.subject, rec.target, rec.layer) == ("pending", "Eiffel Tower", "Rome", 3)
    assert rec.factors == factors and rec.factors_sha256 == hashlib.sha256(factors).hexdigest()
    assert rec.meta == meta and rec.hparams == meta["hparams"] and list(rec.probes) == PROBES
    assert (rec.note, rec.author, rec.answer_before, rec.position) == ("why", "ana", "Paris", None)
    assert rec.prompt == "Eiffel Tower is located in the city of"
    assert rec.created_at.utcoffset() is not None and rec.created_at.utcoffset().total_seconds() == 0
    assert [r.id for r in ledger.pending()] == [edit_id] and ledger.applied() == []
    assert ledger.events(edit_id) == []


def test_apply_marks_status_position_and_event(ledger: Ledger) -> None:
    meta, factors = make_payload()
    edit_id = ledger.record_pending(meta, factors)
    assert ledger.mark_applied(edit_id, meta["checksum_after"], answer_after="Rome", probes=PROBES, actor="ui") == 0
    rec = ledger.get(edit_id)
    assert (rec.status, rec.position, rec.state_checksum, rec.answer_after) == (
        "applied", 0, meta["checksum_after"], "Rome")
    assert [(e.kind, e.actor) for e in ledger.events(edit_id)] == [("applied", "ui")]
    assert ledger.pending() == []


def test_positions_after_revert_and_reapply(ledger: Ledger) -> None:
    a, b, c = (apply_new(ledger, seed) for seed in range(3))
    ledger.set_state_checksums({a: hexsum("s0"), b: hexsum("s1"), c: hexsum("s2")})
    ledger.mark_reverted(b, actor="ana")
    assert [(r.id, r.position) for r in ledger.applied()] == [(a, 0), (c, 1)]
    assert ledger.get(a).state_checksum == hexsum("s0")
    assert ledger.get(c).state_checksum is None  # stale after the rebuild: the service recomputes it
    reverted = ledger.get(b)
    assert (reverted.status, reverted.position) == ("reverted", None)
    assert ledger.mark_reapplied(b, state_checksum=hexsum("s3")) == 2
    assert [(r.id, r.position) for r in ledger.applied()] == [(a, 0), (c, 1), (b, 2)]
    assert [e.kind for e in ledger.events(b)] == ["applied", "reverted", "reapplied"]
    assert ledger.integrity_check() == []


def test_invalid_transitions_are_refused_and_change_nothing(ledger: Ledger) -> None:
    meta, factors = make_payload()
    edit_id = ledger.record_pending(meta, factors)
    with pytest.raises(LedgerError, match="is pending"):
        ledger.mark_reverted(edit_id)
    with pytest.raises(LedgerError, match="position 5"):
        ledger.mark_applied(edit_id, meta["checksum_after"], position=5)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ledger.mark_applied(edit_id, "not-a-checksum")
    assert ledger.get(edit_id).status == "pending" and ledger.events() == []
    ledger.mark_applied(edit_id, meta["checksum_after"])
    with pytest.raises(LedgerError, match="is applied"):
        ledger.mark_applied(edit_id, meta["checksum_after"])
    with pytest.raises(LedgerError, match="no edit #99"):
        ledger.get(99)
    with pytest.raises(LedgerError, match="unknown event kind"):
        ledger.add_event(edit_id, "exploded")


def test_set_state_checksums_is_one_transaction(ledger: Ledger) -> None:
    a = apply_new(ledger, 0)
    meta, factors = make_payload("Other", "Place", 1)
    pending_id = ledger.record_pending(meta, factors)
    with pytest.raises(LedgerError, match="is pending"):
        ledger.set_state_checksums({a: hexsum("new"), pending_id: hexsum("x")})
    assert ledger.get(a).state_checksum == make_payload(seed=0)[0]["checksum_after"]


def test_pending_survives_crash_and_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / "edits.db"
    led = Ledger.open(path, FP)
    ids = [led.record_pending(*make_payload(f"S{i}", f"T{i}", i)) for i in range(3)]
    led.close()  # the process dies before applying: nothing but the ledger file remains
    with Ledger.open(path, FP) as led:
        assert [r.id for r in led.pending()] == ids
        led.mark_applied(ids[0], make_payload(seed=0)[0]["checksum_after"], actor="startup", repaired=True)
        led.mark_failed(ids[1], "weights did not match the recorded checksum", actor="startup", repaired=True)
        led.discard_pending(ids[2])
        assert led.pending() == []
        assert led.get(ids[0]).status == "applied" and led.get(ids[0]).position == 0
        failed = led.get(ids[1])
        assert (failed.status, failed.refusal_reason) == ("failed", "weights did not match the recorded checksum")
        with pytest.raises(LedgerError, match="no edit"):
            led.get(ids[2])
        assert [e.kind for e in led.events()] == ["repaired", "repaired"]


def test_discard_pending_refuses_rows_with_events(ledger: Ledger) -> None:
    edit_id = ledger.record_pending(*make_payload())
    ledger.add_event(edit_id, "imported", actor="cli", detail="from edits.zip")
    with pytest.raises(LedgerError, match="mark_failed"):
        ledger.discard_pending(edit_id)
    assert ledger.get(edit_id).status == "pending"


def test_supersede_links_and_leaves_the_sequence(ledger: Ledger) -> None:
    old = apply_new(ledger, 0, subject="Eiffel Tower")
    keep = apply_new(ledger, 1)
    new = ledger.record_pending(*make_payload("Eiffel Tower", "Berlin", 2))
    assert [r.id for r in ledger.find_applied("  eiffel   TOWER ", "{} IS located in the city of")] == [old]
    ledger.supersede(old, new, actor="ana")
    ledger.mark_applied(new, make_payload(seed=2)[0]["checksum_after"])
    rec = ledger.get(old)
    assert (rec.status, rec.superseded_by, rec.position) == ("superseded", new, None)
    assert [(r.id, r.position) for r in ledger.applied()] == [(keep, 0), (new, 1)]
    assert [r.id for r in ledger.find_applied("eiffel tower", "{} is located in the city of")] == [new]
    assert [(e.kind, e.detail) for e in ledger.events(old)][-1] == ("superseded", f"by edit #{new}")
    with pytest.raises(LedgerError, match="itself"):
        ledger.supersede(new, new)
    assert ledger.mark_reapplied(old) == 2 and ledger.get(old).superseded_by is None


def test_refused_edit_without_factors(ledger: Ledger) -> None:
    meta = {k: v for k, v in make_payload()[0].items() if k not in ("checksum_after", "stats")}
    edit_id = ledger.record_refused(meta, "the edit would not hold on paraphrases", author="ana")
    rec = ledger.get(edit_id)
    assert (rec.status, rec.factors, rec.refusal_reason) == ("refused", None, "the edit would not hold on paraphrases")
    assert [e.kind for e in ledger.events(edit_id)] == ["refused"]
    assert ledger.integrity_check() == []


def test_history_filters_and_duplicates(ledger: Ledger) -> None:
    a = apply_new(ledger, 0, subject="Eiffel Tower")
    b = apply_new(ledger, 1, subject="Louvre")
    ledger.mark_reverted(b)
    assert [r.id for r in ledger.history()] == [b, a]
    assert [r.id for r in ledger.history(status="reverted")] == [b]
    assert [r.id for r in ledger.history(text="EIFFEL")] == [a]
    with pytest.raises(LedgerError, match="unknown status"):
        ledger.history(status="gone")
    meta, factors = make_payload("Eiffel Tower", "Target 0", 0)
    sha = hashlib.sha256(factors).hexdigest()
    assert ledger.is_duplicate(meta, sha)
    assert not ledger.is_duplicate({**meta, "target": "Madrid"}, sha)
    assert not ledger.is_duplicate(meta, hexsum("other factors"))


@pytest.mark.parametrize(("change", "message"), [
    ({"relation": "is located in"}, "exactly one"),
    ({"layer": -1}, "layer"),
    ({"fingerprint": "abc"}, "fingerprint"),
    ({"value_shape": [5]}, "bytes"),
    ({"factors_sha256": "0" * 64}, "factors_sha256"),
    ({"hparams": None}, "hparams"),
])
def test_bad_meta_is_refused(ledger: Ledger, change: dict[str, Any], message: str) -> None:
    meta, factors = make_payload()
    with pytest.raises(LedgerError, match=message):
        ledger.record_pending({**meta, **change}, factors)
    meta.pop("stats")
    with pytest.raises(LedgerError, match="lacks stats"):
        ledger.record_pending(meta, factors)
    with pytest.raises(LedgerError, match="kind"):
        ledger.record_pending(make_payload()[0], factors, probes=[{"prompt": "x", "kind": "other"}])
    assert ledger.history() == []


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "edits.db"
    Ledger.open(path, FP).close()
    with sqlite3.connect(path) as con:
        con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match=r"schema version '2'.*reads version 1.*--db"):
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


def test_concurrent_writers_keep_positions_dense(tmp_path: Path) -> None:
    path = tmp_path / "edits.db"
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
