"""A superseding edit is computed on the weights it is applied to; checksums stay verifiable; no silent 'applied'."""
from __future__ import annotations

import logging

import pytest
import torch

from editing import EditRequest
from tests.service_helpers import same, start, state

OLD = EditRequest("The Louvre", "{} is located in", "tokyo")
NEW = EditRequest("The Louvre", "{} is located in", "berlin")
OTHER = EditRequest("Big Ben", "{} is in", "paris")


def test_superseding_edit_equals_the_same_edit_on_a_fresh_ledger(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    fresh = start(tmp_path / "fresh.db")
    alone = fresh.apply(NEW)
    svc = start(tmp_path / "ledger.db")
    svc.apply(OLD)
    with caplog.at_level(logging.WARNING):
        result = svc.apply(NEW)
    assert result.superseded == (1,)
    ours, theirs = svc._edits[result.edit_id], fresh._edits[alone.edit_id]  # noqa: SLF001
    assert torch.equal(ours.value_dir, theirs.value_dir) and torch.equal(ours.key_dir, theirs.key_dir)
    assert ours.checksum_before == theirs.checksum_before and ours.checksum_after == theirs.checksum_after
    assert result.record.state_checksum == ours.checksum_after
    assert same(state(svc), state(fresh))
    assert result.probes == alone.probes  # every check, chat row included, answered as on the fresh ledger
    assert not [r for r in caplog.records if "differs" in r.getMessage()]
    assert svc.integrity_problems() == []


def test_later_edits_keep_verifiable_checksums_after_a_supersede(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(tmp_path / "ledger.db")
    svc.apply(OLD)
    svc.apply(OTHER)
    svc.apply(NEW)  # supersedes #1: OTHER moves up, and the parameter's state after it changes
    records = svc.ledger.applied()
    assert [r.subject for r in records] == ["Big Ben", "The Louvre"]
    assert all(r.state_checksum is not None for r in records)
    assert svc.integrity_problems() == []
    restarted = start(tmp_path / "ledger.db")
    assert restarted.integrity_problems() == [] and same(state(restarted), state(svc))


def test_a_missing_state_checksum_is_reported_not_passed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(tmp_path / "ledger.db")
    edit_id = svc.apply(OTHER).edit_id
    with svc.ledger._write.begin() as s:  # noqa: SLF001 - simulate a ledger that lost the checksum
        from db.schema import Edit

        s.get(Edit, edit_id).state_checksum = None
    assert any("no parameter checksum" in p for p in svc.integrity_problems())


def test_revert_rehashes_only_its_own_parameter(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    svc = start(tmp_path / "ledger.db")
    first = svc.apply(OLD).edit_id
    svc.apply(EditRequest("Big Ben", "{} is in", "paris", layer=1))
    hashed: list[str] = []
    real = svc.editor.sequence_checksums
    monkeypatch.setattr(svc.editor, "sequence_checksums", lambda names=None: hashed.append(names) or real(names))
    svc.revert(first)
    assert hashed == [{svc.record(first).param_name}]
    monkeypatch.undo()
    assert svc.integrity_problems() == []


def test_edit_whose_prompt_does_not_hold_is_refused_unless_forced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = start(tmp_path / "ledger.db")
    svc.min_target_prob = 1e-12  # enforce the checks; the tiny model's answers never name the target
    base = state(svc)
    with pytest.raises(ValueError, match="does not name 'berlin'"):
        svc.apply(NEW)
    assert same(state(svc), base)
    refused = svc.history(status="refused")
    assert len(refused) == 1 and refused[0].probes and not refused[0].probes[0]["holds"]
    result = svc.apply(NEW, force=True)
    assert result.record.status == "applied" and not result.probes[0].holds
    assert not same(state(svc), base)


def test_a_superseding_edits_checks_see_the_weights_it_leaves(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import chat_app.service as service_module
    from editing.fingerprint import tensor_checksum

    svc = start(tmp_path / "ledger.db")
    svc.apply(OLD)
    seen: list[str] = []
    real = service_module.complete_batch

    def recording(model, tok, prompts):  # type: ignore[no-untyped-def]
        seen.append(tensor_checksum(svc.editor._current(svc.ledger.get(1).param_name)))  # noqa: SLF001
        return real(model, tok, prompts)

    monkeypatch.setattr(service_module, "complete_batch", recording)
    result = svc.apply(NEW)
    assert seen[-1] == result.record.state_checksum  # the after-checks ran on exactly the final weights
