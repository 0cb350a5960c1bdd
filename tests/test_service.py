"""The service keeps weights and ledger in step: crashes, reverts, supersede, transfer, threads."""
from __future__ import annotations

import dataclasses
import threading

import pytest

import chat_app.service as service_module
from chat_app.transfer import export_file, import_file
from db import LedgerError
from editing import EditRequest
from tests.service_helpers import same, start, state

A = EditRequest("The Eiffel tower", "Located in {}", "rome")
B = EditRequest("The Colosseum", "Located in {}", "london")
C = EditRequest("Big Ben", "{} is in", "paris")


@pytest.fixture
def ledger_path(tmp_path):  # type: ignore[no-untyped-def]
    return tmp_path / "ledger.db"


def test_apply_is_recorded_and_survives_restart(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    base = state(svc)
    result = svc.apply(A, paraphrases=["The Eiffel tower is in"], neighbours=["The Colosseum is in"])
    record = svc.record(result.edit_id)
    assert record.status == "applied" and record.position == 0 and len(record.probes) == 4
    chat = record.probes[-1]  # the chat row: the question about the subject, the reply before and after
    assert chat["kind"] == "chat" and chat["prompt"] == "Where is the Eiffel tower?"
    assert chat["holds"] == (A.target.lower() in chat["after"].lower().split())
    assert not same(state(svc), base)
    assert same(state(start(ledger_path)), state(svc))
    assert [e.kind for e in svc.events(result.edit_id)] == ["applied"]


def test_deferred_checks_equal_the_checks_at_apply_time(ledger_path) -> None:  # type: ignore[no-untyped-def]
    checks = {"paraphrases": ["The Eiffel tower is in"], "neighbours": ["The Colosseum is in"]}
    now = start(ledger_path).apply(A, **checks)
    svc = start(ledger_path.with_name("other.db"))  # nothing remembered: the befores are answered in the background
    later = svc.apply(A, defer_checks=True, **checks)
    assert [p.kind for p in later.probes] == ["edited"] and [p.kind for p in later.pending] == ["paraphrase", "neighbour", "chat"]
    assert all(p.after == "" and p.before is None for p in later.pending)
    answered = svc.checks(later.edit_id, timeout_s=60)
    assert [p.to_dict() for p in answered] == [p.to_dict() for p in now.probes]  # the same answers, only later
    assert [p["kind"] for p in svc.record(later.edit_id).probes] == ["edited", "paraphrase", "neighbour", "chat"]
    # Answered after another edit was applied, they still describe the weights right after this one.
    pending = tuple(dataclasses.replace(p, after="") for p in answered[1:])
    edit = svc._edits[later.edit_id]
    svc.apply(EditRequest(A.subject, "{} is in", "paris"), force=True, lr=5.0, steps=60, clamp_factor=100.0,
              norm_penalty=0.0, kl_factor=0.0)  # a strong edit of the same subject: its answers move
    live = svc.apply(EditRequest("The Louvre", "{} is in", "oslo"), paraphrases=checks["paraphrases"],
                     neighbours=checks["neighbours"]).probes  # the live weights' answers to the same prompts  # fmt: skip
    again = svc.answer_pending(later.edit_id, edit, pending)
    assert [p.after for p in again] == [p.after for p in answered[1:]]
    assert [p.after for p in live[1:3]] != [p.after for p in again[:2]]  # so the view hid them
    svc.revert(later.edit_id)  # no longer applied: nothing to answer
    assert svc.answer_pending(later.edit_id, edit, pending) == ()


def _break(monkeypatch, target, name):  # type: ignore[no-untyped-def]
    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"injected crash in {name}")

    monkeypatch.setattr(target, name, boom)


@pytest.mark.parametrize("where", ["compute", "record_pending", "apply", "probe_after", "mark_applied"])
def test_crash_during_apply_leaves_the_state_before(ledger_path, monkeypatch, where) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    svc.apply(A)
    before = state(svc)
    if where == "compute":
        _break(monkeypatch, svc.editor, "compute")
    elif where in ("record_pending", "mark_applied"):
        _break(monkeypatch, svc.ledger, where)
    elif where == "apply":
        _break(monkeypatch, svc.editor, "apply")
    else:
        # the chat answer before comes through the completion cache; the service's own call is the answer after
        _break(monkeypatch, service_module, "answer")
    with pytest.raises(RuntimeError, match="injected"):
        svc.apply(B)
    monkeypatch.undo()
    assert same(state(svc), before)  # the live model was put back
    restarted = start(ledger_path)
    assert same(state(restarted), before)  # and a restart agrees
    assert [r.subject for r in restarted.ledger.applied()] == [A.subject]
    assert not restarted.ledger.pending() and not restarted.ledger.integrity_check()


@pytest.mark.parametrize("where", ["revert", "mark_reverted"])
def test_crash_during_revert_leaves_the_state_before(ledger_path, monkeypatch, where) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    first = svc.apply(A).edit_id
    svc.apply(B)
    before = state(svc)
    _break(monkeypatch, svc.editor if where == "revert" else svc.ledger, where)
    with pytest.raises(RuntimeError, match="injected"):
        svc.revert(first)
    monkeypatch.undo()
    assert same(state(svc), before)
    assert same(state(start(ledger_path)), before)


def test_out_of_order_revert_equals_rebuild_and_reapply(ledger_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    ids = [svc.apply(r).edit_id for r in (A, B, C)]
    svc.revert(ids[0])
    assert [r.id for r in svc.ledger.applied()] == ids[1:]
    assert same(state(start(ledger_path)), state(svc))
    assert not svc.integrity_problems()
    svc.reapply(ids[0])
    assert [r.id for r in svc.ledger.applied()] == [ids[1], ids[2], ids[0]]
    assert same(state(start(ledger_path)), state(svc))
    with pytest.raises(ValueError, match="only reverted or superseded"):
        svc.reapply(ids[1])


def test_supersede_same_subject_and_relation(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    base = state(svc)
    old = svc.apply(A).edit_id
    assert [r.id for r in svc.conflicts(EditRequest(A.subject, A.relation, "london"))] == [old]
    new = svc.apply(EditRequest(A.subject, A.relation, "london"))
    assert new.superseded == (old,)
    assert svc.record(old).status == "superseded" and svc.record(old).superseded_by == new.edit_id
    fresh = start(ledger_path.with_name("other.db"))
    assert same(state(fresh), base)
    fresh.editor.apply(svc._edits[new.edit_id])
    assert same(state(fresh), state(svc))  # only the new edit is in the weights


def test_export_import_reproduces_weights(ledger_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    for r in (A, B):
        svc.apply(r)
    path = tmp_path / "edits.zip"
    assert export_file(svc, path) == 2
    other = start(tmp_path / "fresh.db")
    report = import_file(other, path)
    assert len(report.imported) == 2 and report.skipped == 0
    assert same(state(other), state(svc))
    assert same(state(start(tmp_path / "fresh.db")), state(svc))
    again = import_file(other, path)
    assert again.imported == () and again.skipped == 2


def test_import_for_another_model_is_refused(ledger_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    svc.apply(A)
    path = tmp_path / "edits.zip"
    export_file(svc, path)
    stranger = start(tmp_path / "stranger.db", seed=1)
    before = state(stranger)
    with pytest.raises(LedgerError, match="another model"):
        import_file(stranger, path)
    assert same(state(stranger), before) and not stranger.ledger.history()


def test_ledger_for_another_model_is_refused_at_start(ledger_path) -> None:  # type: ignore[no-untyped-def]
    start(ledger_path).apply(A)
    with pytest.raises(LedgerError, match="another --db"):
        start(ledger_path, seed=1)


def test_two_threads_applying_end_consistent(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    errors: list[BaseException] = []

    def work(request: EditRequest) -> None:
        try:
            svc.apply(request)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(r,)) for r in (A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.position for r in svc.ledger.applied()) == [0, 1]
    assert same(state(start(ledger_path)), state(svc)) and not svc.integrity_problems()


def test_read_only_refuses_changes(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    svc.read_only = True
    with pytest.raises(PermissionError):
        svc.apply(A)
    assert not svc.ledger.history()


def test_invalid_request_changes_nothing(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    before = state(svc)
    with pytest.raises(ValueError, match="out of range"):
        svc.apply(EditRequest("The Eiffel tower", "Located in {}", "rome", layer=40))
    assert same(state(svc), before) and not svc.ledger.history()


def test_edit_that_does_not_take_is_refused_and_recorded(ledger_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(ledger_path)
    svc.min_target_prob = 0.99  # the tiny model cannot reach this
    before = state(svc)
    with pytest.raises(ValueError, match="did not reach the target"):
        svc.apply(A)
    assert same(state(svc), before)
    assert [r.status for r in svc.ledger.history()] == ["refused"]
    assert not svc.ledger.applied()


@pytest.mark.parametrize("cov", ["indefinite", "singular"])
def test_degenerate_statistics_refuse_the_edit_and_record_it(ledger_path, cov: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    svc = start(ledger_path)
    editor = svc.editor
    key = (editor.hparams.layer, editor.hparams.stats_samples)
    d = editor._covs[key].shape[0]  # noqa: SLF001 - the test plants a degenerate C
    editor._covs[key] = -torch.eye(d, dtype=torch.float64) if cov == "indefinite" else torch.zeros(d, d, dtype=torch.float64)  # noqa: SLF001
    base = state(svc)
    with pytest.raises(ValueError, match="edit refused: the key statistics"):
        svc.apply(A)
    (record,) = svc.history()
    assert record.status == "refused" and "key statistics" in record.refusal_reason
    assert same(state(svc), base) and svc.ledger.applied() == []
