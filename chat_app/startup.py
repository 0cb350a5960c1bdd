"""Start-up: bind the ledger to the model, repair interrupted operations, replay applied edits."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from chat_app.service import EditService
from db import EditRecord, LedgerError
from editing.fact_payload import Applied, decode_payload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartupReport:
    replayed: int
    repaired: tuple[int, ...]  # pending edits found and marked failed
    mismatches: tuple[int, ...]  # applied edits whose stored state checksum differs after replay
    seconds: float


def replay(service: EditService, progress: Callable[[int, int], None] | None = None,
           skip: tuple[int, ...] = ()) -> StartupReport:  # fmt: skip
    """Rebuild the model as base weights + every applied edit, in order, from the stored factors.

    Raises ``LedgerError`` when the ledger belongs to another model, or when an applied edit's
    stored factors are damaged (naming it, and how to start without it). A pending edit (a crash
    before its commit) never reached the ledger's applied sequence: it is marked failed. Each
    applied edit in ``skip`` is quarantined first: marked failed, with an event in its audit trail.
    """
    t0 = time.perf_counter()
    ledger, editor = service.ledger, service.editor
    ledger.bind_model(editor.fingerprint)
    repaired = []
    for record in ledger.pending():
        ledger.mark_failed(record.id, "interrupted before it was applied; the weights never held it",
                           actor="start-up", repaired=True)  # fmt: skip
        repaired.append(record.id)
    for edit_id in skip:
        if ledger.get(edit_id).status == "applied":  # a later start with the same flag has nothing to do
            ledger.quarantine(edit_id, "skipped at start-up (--skip-edit): not replayed", actor="start-up")
    ids, mismatches = service.rebuild(decode=_decode)  # the service's one rebuild path
    if progress is not None:
        progress(len(ids), len(ids))
    if ids:
        try:
            ledger.add_event(None, "replayed", actor="start-up", detail=f"{len(ids)} edits replayed")
        except LedgerError as err:  # a read-only ledger file still serves chats and history
            log.warning("could not record the replay: %s", err)
    return StartupReport(len(ids), tuple(repaired), tuple(mismatches), time.perf_counter() - t0)


def _decode(record: EditRecord) -> Applied:
    try:
        return decode_payload(record.meta, record.factors or b"")
    except ValueError as err:
        raise LedgerError(
            f"applied edit #{record.id} ({record.prompt!r:.80} → {record.target!r:.40}) cannot be replayed: {err}; "
            "the ledger's copy of it is damaged. Nothing was changed. To start without it, run the app with "
            f"--skip-edit {record.id} (the edit is marked failed, with an event in its audit trail; the others are "
            f"replayed), then export the others if you like: app.py --skip-edit {record.id} export others.zip. "
            "Or restore the ledger from a backup."
        ) from err
