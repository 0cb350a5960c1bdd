"""Ledger batches (no torch): facts with shares at several layers, one transaction per batch operation."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from db import Ledger, LedgerError
from tests.test_db_ledger import FP, apply_new, hexsum, make_payload


def fact_payload(subject: str, index: int, size: int, batch: str = "b1") -> tuple[dict, bytes]:
    """A batch fact shaped like the engine's: shares at layers 2 and 3, the top share's meta on top."""
    parts = [make_payload(subject, f"T{index}", seed=10 * index + j) for j in range(2)]
    shares = []
    for j, (meta, _) in enumerate(parts):
        layer = 2 + j
        shares.append({**meta, "layer": layer, "param_name": f"transformer.h.{layer}.mlp.c_proj.weight",
                       "stats": {"batch": {"id": batch, "fact": index, "size": size, "layers": [2, 3]}}})
    factors = b"".join(f for _, f in parts)
    meta = {**shares[-1], "format": "rome-chat/memit-fact/1", "shares": shares,
            "factors_sha256": hashlib.sha256(factors).hexdigest()}
    return meta, factors


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with Ledger.open(ledger_url, FP) as led:
        yield led


def test_a_batch_is_recorded_whole_with_its_columns_and_all_shares(ledger: Ledger) -> None:
    alone = apply_new(ledger, 1)
    entries = [{"meta": m, "factors": f, "state_checksum": hexsum(f"s{i}")}
               for i, (m, f) in enumerate(fact_payload(s, i, 2) for i, s in enumerate(["A", "B"]))]
    ids = ledger.record_batch(entries, actor="tester")
    records = ledger.batch("b1")
    assert [r.id for r in records] == ids and [(r.batch_index, r.batch_size) for r in records] == [(0, 2), (1, 2)]
    assert [r.position for r in records] == [1, 2] and len(records[0].factors) == 2 * 40
    assert [r.id for r in ledger.history(batch="b1")] == ids[::-1] and ledger.get(alone).batch_id is None
    assert ledger.integrity_check() == []
    # reverting the first fact clears the state checksums of later edits of either of its parameters
    later = apply_new(ledger, 2)  # layer 3: the facts' top parameter
    ledger.set_state_checksums({later: hexsum("x")})
    ledger.mark_reverted_many([ids[0]], actor="tester")
    assert ledger.get(ids[1]).state_checksum is None and ledger.get(later).state_checksum is None
    ledger.mark_reverted_many([ids[1]])
    assert [r.id for r in ledger.applied()] == [alone, later]
    ledger.mark_reapplied_many({ids[0]: hexsum("a"), ids[1]: None})
    assert [r.id for r in ledger.applied()] == [alone, later, *ids]


def test_a_batch_that_fails_anywhere_records_nothing(ledger: Ledger) -> None:
    good = fact_payload("A", 0, 2)
    bad_meta, bad_factors = fact_payload("B", 1, 2)
    with pytest.raises(LedgerError, match="fact 1"):
        ledger.record_batch([{"meta": good[0], "factors": good[1]}, {"meta": bad_meta, "factors": bad_factors[:-4]}])
    other = fact_payload("C", 1, 2, batch="b2")
    with pytest.raises(LedgerError, match="same batch id"):
        ledger.record_batch([{"meta": good[0], "factors": good[1]}, {"meta": other[0], "factors": other[1]}])
    existing = apply_new(ledger, 5, subject="A")  # the same fact, applied meanwhile and not superseded
    with pytest.raises(LedgerError, match="meanwhile"):
        ledger.record_batch([{"meta": good[0], "factors": good[1]}])
    assert [r.id for r in ledger.history()] == [existing]
    ids = ledger.record_batch([{"meta": good[0], "factors": good[1]}], supersedes=[existing])
    assert ledger.get(existing).superseded_by == ids[0] and ledger.applied_ids() == ids
