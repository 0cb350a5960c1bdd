"""Ledger: records round-trip, status transitions and events, positions, supersede, crash repair."""
from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db import Ledger, LedgerError

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
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """A new ledger on SQLite and on PostgreSQL (tests/conftest.py)."""
    with Ledger.open(ledger_url, FP) as led:
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
    assert (rec.layers, rec.layer_label) == ([3], "3")
    spread = dataclasses.replace(rec, meta={**meta, "shares": [{"layer": 7}, {"layer": 5}, {"layer": 6}]})
    assert (spread.layers, spread.layer_label) == ([7, 5, 6], "5–7")  # a fact spread over layers names them all
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
    meta["param_name"] = ""  # refused before the parameter was chosen
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


def test_mark_applied_supersedes_in_one_transaction(ledger: Ledger) -> None:
    old, keep = apply_new(ledger, 0, subject="Eiffel Tower"), apply_new(ledger, 1)
    meta, factors = make_payload("Eiffel Tower", "Berlin", 2)
    new = ledger.record_pending(meta, factors)
    with pytest.raises(LedgerError, match=f"edit #{new} is pending"):
        ledger.mark_applied(new, meta["checksum_after"], supersedes=[old, new])
    assert ledger.get(old).status == "applied" and ledger.get(new).status == "pending"  # rolled back whole
    assert ledger.mark_applied(new, meta["checksum_after"], supersedes=[old], actor="ana") == 1
    assert [(r.id, r.position) for r in ledger.applied()] == [(keep, 0), (new, 1)]
    assert (ledger.get(old).status, ledger.get(old).superseded_by) == ("superseded", new)
    assert ledger.integrity_check() == []


def test_record_imported_is_all_or_nothing(ledger: Ledger) -> None:
    first = apply_new(ledger, 0)
    entries = [{"meta": m, "factors": f, "note": "from alice", "state_checksum": hexsum(f"s{i}")}
               for i, (m, f) in enumerate(make_payload(f"S{i}", f"T{i}", i + 10) for i in range(2))]
    bad = {**entries[1], "factors": entries[1]["factors"][:-4]}
    with pytest.raises(LedgerError, match="imported edit 1: factors hold 36 bytes"):
        ledger.record_imported([entries[0], bad])
    assert [r.id for r in ledger.history()] == [first]
    ids = ledger.record_imported(entries, actor="cli")
    assert [(r.id, r.position) for r in ledger.applied()] == [(first, 0), (ids[0], 1), (ids[1], 2)]
    assert ledger.get(ids[1]).state_checksum == hexsum("s1") and ledger.get(ids[0]).note == "from alice"
    assert [(e.kind, e.actor) for e in ledger.events(ids[0])] == [("imported", "cli")]
    assert ledger.is_duplicate(entries[0]["meta"], hashlib.sha256(entries[0]["factors"]).hexdigest())


def test_conflicting_applies_end_with_exactly_one(ledger: Ledger) -> None:
    """Two instances correct one fact at once: each looked before the other applied, so neither supersedes."""
    meta_a, factors_a = make_payload("Eiffel Tower", "Rome", 1)
    meta_b, factors_b = make_payload("eiffel  tower", "Berlin", 2)
    a, b = ledger.record_pending(meta_a, factors_a), ledger.record_pending(meta_b, factors_b)
    revision = ledger.revision()
    ledger.mark_applied(a, meta_a["checksum_after"])
    assert ledger.revision() > revision  # every write bumps it (triggers)
    with pytest.raises(LedgerError, match=rf"edit #{b} was not applied: edit #{a} corrected the same fact"):
        ledger.mark_applied(b, meta_b["checksum_after"])
    assert ledger.applied_ids() == [a] and ledger.get(b).status == "pending"
    ledger.mark_applied(b, meta_b["checksum_after"], supersedes=[a])  # seen and superseded: fine
    assert ledger.applied_ids() == [b] and ledger.get(a).status == "superseded"


def test_checks_answered_later_are_appended_to_an_applied_edit(ledger: Ledger) -> None:
    meta, factors = make_payload()
    edit_id = ledger.record_pending(meta, factors, PROBES[:1])
    with pytest.raises(LedgerError, match="not an applied edit"):
        ledger.add_probes(edit_id, PROBES[1:])  # pending: not yet
    ledger.mark_applied(edit_id, meta["checksum_after"], probes=PROBES[:1])
    ledger.add_probes(edit_id, PROBES[1:])
    assert list(ledger.get(edit_id).probes) == PROBES
    with pytest.raises(LedgerError):
        ledger.add_probes(edit_id, [{"prompt": 3}])  # validated like any probes
    assert list(ledger.get(edit_id).probes) == PROBES
