"""Who did it: with --auth, the signed-in user is the author of web edits and the actor of reverts and imports."""
from __future__ import annotations

from types import SimpleNamespace

from chat_app.service import EditService
from chat_app.ui_handlers import Handlers, signed_in
from tests.test_ui_handlers import RELATION, service  # noqa: F401 - the tiny service fixture

ALICE, BOB = SimpleNamespace(username="alice"), SimpleNamespace(username="bob")


def apply_as(h: Handlers, user: object, subject: str = "The Eiffel Tower", target: str = "Rome") -> str:
    hp = h.service.editor.hparams
    text, _ = h.apply(subject, RELATION, target, "", "", 1, hp.steps, hp.lr, hp.kl_factor, None, request=user)
    return text


def test_signed_in_user_is_recorded_shown_and_filtered(service: EditService) -> None:  # noqa: F811
    h = Handlers(service)
    assert "Edit #1 applied" in apply_as(h, ALICE)
    assert "Edit #2 applied" in apply_as(h, None, subject="The Colosseum")  # no --auth: the app's actor
    assert service.record(1).author == "alice" and service.record(2).author == "app"
    h.revert(1, request=BOB)
    h.reapply(1, request=ALICE)
    assert [(e.kind, e.actor) for e in service.events(1)] == [("applied", "alice"), ("reverted", "bob"),
                                                              ("reapplied", "alice")]  # fmt: skip
    table = h.history()
    assert dict(zip(table["id"], table["author"])) == {1: "alice", 2: "app"}
    assert list(h.history(text="ALICE")["id"]) == [1] and h.history(text="carol").empty
    assert "weights synced with the ledger at" in h.banner()


def test_signed_in_ignores_anonymous_requests() -> None:
    assert signed_in(None) is None and signed_in(SimpleNamespace(username=None)) is None
    assert signed_in(SimpleNamespace(username="  ")) is None and signed_in(BOB) == "bob"
