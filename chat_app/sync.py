"""How an instance follows the ledger: ``EditService.sync`` brings the weights to its applied set.

Several app instances (and the CLI) share one ledger. Each instance's weights must equal the
base model plus the ledger's applied edits, in order. ``sync`` is the one rebuild path: it
applies or reverts stored factors (never recomputes), under the edit mutex (not beside an
edit of this instance) and the weights write lock (not mid-generation). ``chat_app.follow``
calls it when the ledger's revision changes; the service also calls it before each change it
makes, so it never reverts or supersedes an edit it has not loaded.
"""
from __future__ import annotations

import logging
import threading
import time

from chat_app.locks import RWLock
from db import Ledger
from editing import RankOneEdit, RomeEditor

log = logging.getLogger(__name__)


class LedgerSync:
    """Mixed into ``EditService``: the state it declares is set up by the service."""

    editor: RomeEditor
    ledger: Ledger
    weights: RWLock
    synced_at: float | None
    _edit_mutex: threading.Lock
    _edits: dict[int, RankOneEdit]

    def sync(self) -> bool:
        """Bring the weights to the ledger's applied set, from the stored factors (no recomputation).

        How an instance follows edits, reverts and imports made by other instances or the CLI
        (``chat_app.follow``). Waits for an edit in progress here, then for running chats (the
        weights write lock): never changes weights mid-generation. Returns whether they changed.
        """
        with self._edit_mutex:
            return self._sync_locked()

    def _applied_ids(self) -> list[int | None]:
        by_object = {id(edit): edit_id for edit_id, edit in self._edits.items()}
        return [by_object.get(id(e)) for e in self.editor.applied]

    def _sync_locked(self, rebuild: bool = False) -> bool:
        """``sync`` with the edit mutex held; ``rebuild=True`` rebuilds every parameter (after a failure)."""
        now = time.time()
        if not rebuild and self._applied_ids() == self.ledger.applied_ids():
            self.synced_at = now
            return False
        with self.weights.write():
            records = self.ledger.applied()
            ids, held = [r.id for r in records], self._applied_ids()
            edits = [self._edits.get(r.id) or RankOneEdit.from_payload(r.meta, r.factors or b"") for r in records]
            if not rebuild and held == ids[: len(held)]:  # only additions: apply the new ones on top
                for edit in edits[len(held):]:
                    self.editor.apply(edit)
            elif rebuild or held != ids:
                self.editor.rebuild(edits)
            self._edits = dict(zip(ids, edits))
        self.synced_at = now
        log.info("weights synced with the ledger: %d edits applied (were %s)", len(ids), held)
        return True

