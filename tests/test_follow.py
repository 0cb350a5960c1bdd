"""Instances follow the shared ledger: two services on one ledger (SQLite file and PostgreSQL), in one process."""
from __future__ import annotations

import threading

import pytest

from chat_app.follow import Follower
from chat_app.service import EditService
from db import LedgerError
from editing import EditRequest
from tests.pg_server import wait_until
from tests.service_helpers import same, start, state

A = EditRequest("The Eiffel tower", "Located in {}", "rome")
A2 = EditRequest("the eiffel  tower", "Located in {}", "london")
B = EditRequest("The Colosseum", "Located in {}", "paris")
FOLLOW_S = 30.0  # a bound for a busy CI machine; the 2 s target is measured by bench/instances.py


def reply(service: EditService, text: str = "The Eiffel tower") -> str:
    return "".join(service.chat([{"role": "user", "content": text}], max_new_tokens=6))


def test_edits_and_cli_reverts_reach_every_instance(ledger_url: str) -> None:
    a, b = start(ledger_url), start(ledger_url)
    base = state(a)
    b.read_only = True  # a read-only instance follows too
    followers = [Follower(a).start(), Follower(b).start()]
    try:
        edit_id = a.apply(A).edit_id
        assert wait_until(lambda: b.active_count == 1, FOLLOW_S) is not None, "B did not follow A's edit"
        assert same(state(a), state(b)) and not same(state(b), base)
        assert reply(b) == reply(a)
        cli = start(ledger_url)  # the CLI: a fresh process's view of the ledger
        cli.revert(edit_id, actor="cli")
        assert wait_until(lambda: a.active_count == b.active_count == 0, FOLLOW_S) is not None
        assert same(state(a), base) and same(state(b), base)
        assert b.synced_at is not None and followers[1].syncs >= 2
    finally:
        for follower in followers:
            follower.stop()


def test_an_instance_catches_up_before_it_changes_anything(ledger_url: str) -> None:
    a, b = start(ledger_url), start(ledger_url)  # no followers: only the catch-up inside the service
    first = a.apply(A).edit_id
    result = b.apply(A2)  # B has not loaded A's edit, but supersedes it
    assert result.superseded == (first,)
    b.revert(result.edit_id)
    assert a.ledger.applied_ids() == [] and a.sync() and same(state(a), state(b))


def test_a_conflict_unseen_by_the_second_writer_leaves_exactly_one(ledger_url: str) -> None:
    a, b = start(ledger_url), start(ledger_url)
    first = a.apply(A).edit_id
    b.conflicts = lambda request: []  # B looked before A's edit was committed
    with pytest.raises(LedgerError, match=f"edit #{first} corrected the same fact"):
        b.apply(A2)
    assert b.ledger.applied_ids() == [first] and b.integrity_problems() == []
    assert same(state(a), state(b))
    assert b.history(status="failed")[0].target == "london"


def test_concurrent_corrections_of_one_fact_end_with_one_applied(ledger_url: str) -> None:
    a, b = start(ledger_url), start(ledger_url)
    a.apply(B)
    errors: list[Exception] = []

    def correct(service: EditService, request: EditRequest) -> None:
        try:
            service.apply(request)
        except LedgerError as err:  # the loser, when it looked before the winner committed
            errors.append(err)

    threads = [threading.Thread(target=correct, args=(a, A)), threading.Thread(target=correct, args=(b, A2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(a.ledger.find_applied(A.subject, A.relation)) == 1 and len(errors) <= 1
    a.sync(), b.sync()
    clean = start(ledger_url)
    assert same(state(a), state(clean)) and same(state(b), state(clean))
    assert a.integrity_problems() == b.integrity_problems() == []
