"""Start-up: bind the ledger to the model, repair interrupted operations, replay applied edits."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from chat_app.service import EditService
from db import LedgerError
from editing import RankOneEdit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartupReport:
    replayed: int
    repaired: tuple[int, ...]  # pending edits found and marked failed
    mismatches: tuple[int, ...]  # applied edits whose stored state checksum differs after replay
    seconds: float


def replay(service: EditService, progress: Callable[[int, int], None] | None = None) -> StartupReport:
    """Rebuild the model as base weights + every applied edit, in order, from the stored factors.

    Raises ``LedgerError`` when the ledger belongs to another model. A pending edit (a crash
    before its commit) never reached the ledger's applied sequence: it is marked failed.
    """
    t0 = time.perf_counter()
    ledger, editor = service.ledger, service.editor
    ledger.bind_model(editor.fingerprint)
    repaired = []
    for record in ledger.pending():
        ledger.mark_failed(record.id, "interrupted before it was applied; the weights never held it",
                           actor="start-up", repaired=True)  # fmt: skip
        repaired.append(record.id)
    records = ledger.applied()
    mismatches = []
    with service.weights.write():
        editor.reset()
        service._edits.clear()  # noqa: SLF001 - start-up owns the service's state
        for i, record in enumerate(records):
            edit = RankOneEdit.from_payload(record.meta, record.factors or b"")
            checksum = editor.apply(edit)
            service._edits[record.id] = edit  # noqa: SLF001
            if record.state_checksum is not None and record.state_checksum != checksum:
                mismatches.append(record.id)
            if progress is not None:
                progress(i + 1, len(records))
    service.synced_at = time.time()
    if mismatches:
        log.warning("replay: %d edits reproduced another parameter checksum than stored: %s", len(mismatches), mismatches)
    if records:
        try:
            ledger.add_event(None, "replayed", actor="start-up", detail=f"{len(records)} edits replayed")
        except LedgerError as err:  # a read-only ledger file still serves chats and history
            log.warning("could not record the replay: %s", err)
    return StartupReport(len(records), tuple(repaired), tuple(mismatches), time.perf_counter() - t0)
