"""MEMIT batches through the service: one ledger edit per fact, exact reverts, replay, and crash safety."""
from __future__ import annotations

import pytest

from db import Ledger, LedgerError
from editing import EditRequest
from tests.service_helpers import same, start, state

FACTS = [
    EditRequest("The Eiffel tower", "Located in {}", "rome"),
    EditRequest("The Colosseum", "Located in {}", "london"),
    EditRequest("Big Ben", "{} is in", "paris"),
]
HP = {"batch_layers": (1, 2), "mom2_weight": 1.0}  # two layers: each fact has a share at both


@pytest.fixture
def ledger_path(tmp_path):  # type: ignore[no-untyped-def]
    return tmp_path / "ledger.db"


def test_batch_is_recorded_as_one_edit_per_fact_with_all_its_shares(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path, **HP)
    base = state(svc)
    result = svc.apply_batch(FACTS, checks=[(["The Eiffel tower is in"], []), ((), ()), ((), ())])
    records = svc.ledger.batch(result.batch_id)
    assert [r.id for r in records] == list(result.edit_ids) and len(records) == 3
    assert [(r.batch_id, r.batch_index, r.batch_size) for r in records] == [(result.batch_id, i, 3) for i in range(3)]
    assert all(r.status == "applied" for r in records) and [r.position for r in records] == [0, 1, 2]
    assert all([s["layer"] for s in r.meta["shares"]] == [1, 2] for r in records)
    assert len(result.probes[0]) == 2 and result.probes[0][0].kind == "edited"
    assert len(svc.editor.applied) == 6 and not same(state(svc), base)
    assert svc.integrity_problems() == []
    assert [r.id for r in svc.history(batch=result.batch_id)] == sorted(result.edit_ids, reverse=True)


def test_reverting_one_fact_keeps_the_others_and_equals_a_rebuild(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path, **HP)
    ids = svc.apply_batch(FACTS).edit_ids
    svc.revert(ids[1])
    assert [r.status for r in svc.ledger.batch(svc.record(ids[0]).batch_id)] == ["applied", "reverted", "applied"]
    assert svc.integrity_problems() == []
    assert same(state(start(ledger_path, **HP)), state(svc))  # a fresh process rebuilds the same weights
    svc.reapply(ids[1])
    assert svc.integrity_problems() == [] and same(state(start(ledger_path, **HP)), state(svc))


def test_reverting_the_whole_batch_restores_the_baseline_exactly(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path, **HP)
    base = state(svc)
    svc.apply(EditRequest("Mount Fuji", "{} is in", "japan"))  # an edit of its own, before the batch, stays
    single = state(svc)
    result = svc.apply_batch(FACTS)
    records = svc.revert_batch(result.batch_id)
    assert [r.status for r in records] == ["reverted"] * 3 and same(state(svc), single)
    assert svc.integrity_problems() == []
    svc.reapply_batch(result.batch_id)
    assert [r.status for r in svc.ledger.batch(result.batch_id)] == ["applied"] * 3
    assert same(state(start(ledger_path, **HP)), state(svc)) and svc.integrity_problems() == []
    svc.revert_batch(result.batch_id)
    svc.revert(svc.ledger.applied()[0].id)
    assert same(state(svc), base)
    with pytest.raises(ValueError, match="no batch"):
        svc.revert_batch("nosuchbatch")


def test_replay_after_restart_equals_the_live_weights(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path, **HP)
    svc.apply_batch(FACTS[:2])
    svc.apply(FACTS[2])
    live = state(svc)
    again = start(ledger_path, **HP)
    assert same(state(again), live) and again.integrity_problems() == []
    assert [len(again._edits[i].edits) if hasattr(again._edits[i], "edits") else 1 for i in again._edits] == [2, 2, 1]


def test_a_superseding_batch_equals_the_same_batch_on_a_fresh_ledger(ledger_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fresh = start(tmp_path / "fresh.db", **HP)
    alone = fresh.apply_batch(FACTS)
    svc = start(ledger_path, **HP)
    first = svc.apply(EditRequest("The Eiffel tower", "located in {}", "paris")).edit_id  # at layer 2, a batch layer
    result = svc.apply_batch(FACTS)
    assert result.superseded == (first,) and svc.record(first).superseded_by == result.edit_ids[0]
    assert svc.integrity_problems() == [] and same(state(start(ledger_path, **HP)), state(svc))
    assert same(state(svc), state(fresh)) and result.probes == alone.probes  # computed without the old edit
    assert [r.factors for r in result.records] == [r.factors for r in alone.records]


@pytest.mark.parametrize("where", ["compute", "apply", "record"])
def test_a_crash_during_the_batch_applies_nothing(ledger_path, monkeypatch, where) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path, **HP)
    svc.apply(FACTS[0])
    before, ids = state(svc), svc.ledger.applied_ids()
    if where == "compute":
        monkeypatch.setattr(svc.editor, "compute_batch", _boom)
    elif where == "apply":  # the second fact's shares fail to go in: the first's are already in the weights
        real, calls = svc.editor.apply, []

        def apply_then_crash(edit):  # type: ignore[no-untyped-def]
            calls.append(edit)
            if len(calls) == 2:
                raise RuntimeError("injected crash in apply")
            return real(edit)

        monkeypatch.setattr(svc.editor, "apply", apply_then_crash)
    else:  # the ledger's one transaction fails at its commit
        monkeypatch.setattr(Ledger, "record_batch", _boom)
    with pytest.raises(RuntimeError, match="injected"):
        svc.apply_batch(FACTS[1:])
    monkeypatch.undo()
    assert svc.ledger.applied_ids() == ids and same(state(svc), before) and svc.integrity_problems() == []
    assert all(r.batch_id is None for r in svc.history())
    assert same(state(start(ledger_path, **HP)), before)


def test_an_unseen_edit_of_a_fact_from_elsewhere_refuses_the_batch_in_the_ledger(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path, **HP)
    batch = svc.editor.compute_batch(FACTS[:1])
    from editing.fact_payload import fact_payload

    meta, factors = fact_payload(batch, 0)
    svc.apply(FACTS[0])
    with pytest.raises(LedgerError, match="meanwhile"):
        svc.ledger.record_batch([{"meta": meta, "factors": factors}])


def _boom(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise RuntimeError("injected crash")


def test_a_batch_travels_in_an_edit_pack_with_its_shares(ledger_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from chat_app.transfer import export_file, import_file

    svc = start(ledger_path, **HP)
    result = svc.apply_batch(FACTS[:2])
    pack = tmp_path / "pack.zip"
    assert export_file(svc, pack) == 2
    other = start(tmp_path / "other.db", **HP)
    report = import_file(other, pack)
    assert len(report.imported) == 2 and same(state(other), state(svc)) and other.integrity_problems() == []
    assert {r.batch_id for r in other.history()} == {result.batch_id}  # the batch columns come from the meta
    assert same(state(start(tmp_path / "other.db", **HP)), state(svc))


def test_a_follower_takes_and_drops_a_batch_from_the_ledger(ledger_path) -> None:  # type: ignore[no-untyped-def]
    a, b = start(ledger_path, **HP), start(ledger_path, **HP)
    base = state(b)
    result = a.apply_batch(FACTS)
    assert b.sync() and same(state(b), state(a)) and b.integrity_problems() == []
    a.revert(result.edit_ids[0])
    assert b.sync() and same(state(b), state(a)) and b.integrity_problems() == []
    b.revert_batch(result.batch_id)  # the follower acts on the batch too
    assert a.sync() and same(state(a), base) and a.integrity_problems() == []
