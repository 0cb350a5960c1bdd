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

from collections.abc import Callable

from chat_app.locks import RWLock
from db import EditRecord, Ledger, LedgerError
from editing import RomeEditor
from editing.fact_payload import Applied, decode_payload, shares

log = logging.getLogger(__name__)
Decode = Callable[[EditRecord], Applied]


def decode_record(record: EditRecord) -> Applied:
    """The stored edit: one rank-one update, or a batch fact's shares at every layer (exact factors)."""
    return decode_payload(record.meta, record.factors or b"")


class LedgerSync:
    """Mixed into ``EditService``: the state it declares is set up by the service."""

    editor: RomeEditor
    ledger: Ledger
    weights: RWLock
    synced_at: float | None
    _edit_mutex: threading.Lock
    _edits: dict[int, Applied]  # ledger id -> what that edit added to the weights

    def sync(self) -> bool:
        """Bring the weights to the ledger's applied set, from the stored factors (no recomputation).

        How an instance follows edits, reverts and imports made by other instances or the CLI
        (``chat_app.follow``). Waits for an edit in progress here, then for running chats (the
        weights write lock): never changes weights mid-generation. Returns whether they changed.
        """
        with self._edit_mutex:
            return self._sync_locked()

    def _applied_ids(self) -> list[int | None]:
        """The ledger ids of the edits in the weights, in order (a batch fact's shares are contiguous: one id)."""
        owner = {id(share): edit_id for edit_id, edit in self._edits.items() for share in shares(edit)}
        ids: list[int | None] = []
        for share in self.editor.applied:
            edit_id = owner.get(id(share))
            if not ids or edit_id is None or ids[-1] != edit_id:
                ids.append(edit_id)
        return ids

    def _state_checksums(self, names: set[str] | None = None) -> list[tuple[int, str | None]]:
        """``(id, checksum)`` per applied edit, in order: its parameter's state right after it (see ``sequence_checksums``).

        An edit's parameter is its last share's (a batch fact's top layer, as the ledger's ``param_name``).
        """
        last = {id(shares(edit)[-1]): edit_id for edit_id, edit in self._edits.items()}
        sums = self.editor.sequence_checksums(names)
        return [(last[id(e)], c) for e, c in zip(self.editor.applied, sums) if id(e) in last]

    def _sync_locked(self, rebuild: bool = False) -> bool:
        """``sync`` with the edit mutex held; ``rebuild=True`` rebuilds every parameter (after a failure)."""
        now = time.time()
        if rebuild:
            self._rebuild_locked()
            return True
        if self._applied_ids() == self.ledger.applied_ids():
            self.synced_at = now
            return False
        records = self.ledger.applied()
        ids, held = [r.id for r in records], self._applied_ids()
        if held != ids[: len(held)]:  # something was reverted or superseded elsewhere: rebuild
            self._rebuild_locked(records)
            return True
        with self.weights.write():
            for record in records[len(held):]:  # only additions: apply the new ones on top
                edit = decode_record(record)
                self.editor.apply(edit)
                self._edits[record.id] = edit
        self.synced_at = now
        log.info("weights synced with the ledger: %d edits applied (were %s)", len(ids), held)
        return True

    def rebuild(self, decode: Decode = decode_record) -> tuple[list[int], list[int]]:
        """The one full rebuild (start-up, and after a failure): base weights plus every applied edit, in order.

        Every stored payload is decoded (``decode`` may raise) before any weight changes. Returns the
        applied ids and those whose stored state checksum differs from the one the rebuild reproduces;
        a checksum the ledger lacks (a revert or supersede stopped before storing it) is stored.
        """
        with self._edit_mutex:
            return self._rebuild_locked(decode=decode)

    def _rebuild_locked(self, records: list[EditRecord] | None = None,
                        decode: Decode = decode_record) -> tuple[list[int], list[int]]:  # fmt: skip
        records = self.ledger.applied() if records is None else records
        edits = [self._edits.get(r.id) or decode(r) for r in records]
        missing, mismatches = {}, []
        with self.weights.write():
            self.editor.rebuild([share for edit in edits for share in shares(edit)])
            self._edits = {r.id: e for r, e in zip(records, edits)}
            for record, (_, checksum) in zip(records, self._state_checksums()):
                if record.state_checksum is None:
                    missing[record.id] = checksum
                elif record.state_checksum != checksum:
                    mismatches.append(record.id)
        self.synced_at = time.time()
        if mismatches:
            log.warning("rebuild: %d edits reproduced another parameter checksum than stored: %s", len(mismatches),
                        mismatches)  # fmt: skip
        if missing:
            try:
                self.ledger.set_state_checksums(missing)
            except (LedgerError, ValueError) as err:  # a read-only ledger still serves chats
                log.warning("could not store the state checksums of edits %s: %s", sorted(missing), err)
        return [r.id for r in records], mismatches
