"""``Ledger``: the durable record of every edit made to one model, and of what happened to it.

The service drives the ledger through each edit's life, one transaction per call:

    edit_id = ledger.record_pending(meta, factors, ...)    # before the weights change
    ... apply to the weights, verify the parameter checksum ...
    ledger.mark_applied(edit_id, checksum_after, ...)       # after they did

A crash between the two leaves a 'pending' row; at start-up the service lists ``pending()``
and resolves each one (``mark_applied(..., repaired=True)``, ``mark_failed`` or
``discard_pending``). Applied edits form a dense sequence, positions 0..n-1: reverting or
superseding removes an edit from it (later ones move up), re-applying appends at the end.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import URL, delete, func, make_url, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import durability
from db.batches import LedgerBatches
from db.engine import READ_ONLY, create_ledger_engine, creating, describe, sqlite_file, to_url
from db.postgres import serialise_writers
from db.queries import LedgerReads, load_edit, normalise
from db.records import check_hex64, validate_meta, validate_probes
from db.schema import EVENT_KINDS, Edit, Event, LedgerError, MetaEntry, prepare_schema
from db.sequence import leave_sequence, lock_sequence, new_row, next_position, supersede_row

logger = logging.getLogger(__name__)


def _short(fingerprint: str) -> str:
    return fingerprint[:12]


class Ledger(LedgerBatches, LedgerReads, durability.LedgerFiles):
    """An edit ledger in any SQLAlchemy database. Every public method is one transaction."""

    def __init__(self, url: str | URL | Path) -> None:
        """Open the ledger at ``url`` (a SQLAlchemy URL, or a file path meaning SQLite), creating it if new."""
        self.url = url if isinstance(url, URL) else make_url(to_url(url))
        self.where = describe(self.url)
        self.file = sqlite_file(self.url)  # None unless a SQLite file
        with creating(self.file) if self.file is not None else nullcontext(True) as new:
            # only a path that did not exist may start empty
            durability.refuse_missing_tables(None, self.where, self.file, new)
            self._engine = create_ledger_engine(self.url)
            self._closed = False
            serialise_writers(self._engine)  # PostgreSQL: one writer at a time, as SQLite's BEGIN IMMEDIATE
            try:
                durability.refuse_missing_tables(self._engine, self.where, self.file, new)
                prepare_schema(self._engine, self.where)
            except SQLAlchemyError as err:
                self._engine.dispose()
                reason = getattr(err, "orig", None) or err
                raise LedgerError(f"cannot open ledger {self.where}: {reason}; check the --db path") from err
            except LedgerError:
                self._engine.dispose()
                raise
        self._write = sessionmaker(self._engine, expire_on_commit=False)
        self._read = sessionmaker(self._engine.execution_options(**{READ_ONLY: True}))

    @classmethod
    def open(cls, path_or_url: str | Path, fingerprint: str | None = None) -> Ledger:
        """Open (creating if needed) the ledger at a path or URL, bound to ``fingerprint`` if given."""
        ledger = cls(path_or_url)
        if fingerprint is not None:
            try:
                ledger.bind_model(fingerprint)
            except LedgerError:
                ledger.close()
                raise
        return ledger

    def close(self) -> None:
        """Checkpoint (SQLite: everything into the one database file, the WAL emptied), then disconnect."""
        if self._closed:
            return
        self._closed = True
        try:
            self.checkpoint()
        except (LedgerError, SQLAlchemyError) as err:  # e.g. a read-only file: nothing of ours is in its WAL
            logger.warning("could not checkpoint ledger %s on close: %s", self.where, err)
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- model binding ---------------------------------------------------------------------

    def bind_model(self, fingerprint: str) -> None:
        """Record the model of an empty ledger; refuse a model other than the recorded one."""
        check_hex64(fingerprint, "model fingerprint")
        with self._write.begin() as s:
            self._check_model(s, fingerprint)

    def _check_model(self, s: Session, fingerprint: str) -> None:
        entry = s.get(MetaEntry, "model_fingerprint")
        if entry is None:
            s.add(MetaEntry(key="model_fingerprint", value=fingerprint))
            logger.info("ledger %s bound to model %s", self.where, _short(fingerprint))
        elif entry.value != fingerprint:
            raise LedgerError(
                f"ledger {self.where} holds edits for model {_short(entry.value)}…, but the loaded "
                f"model is {_short(fingerprint)}…. Start with another --db path for this model, "
                "or load the model this ledger was made for."
            )

    # -- life of an edit -------------------------------------------------------------------

    def record_pending(
        self, meta: dict[str, Any], factors: bytes, probes: list[dict[str, Any]] | None = None,
        note: str | None = None, author: str | None = None, answer_before: str | None = None,
    ) -> int:
        """Store a computed edit as 'pending', before it touches the weights; return its id.

        The edit must be for the ledger's model; the first edit binds an unbound ledger.
        """
        if factors is None:
            raise LedgerError("a pending edit needs its factors")
        clean = validate_meta(meta, factors)
        with self._write.begin() as s:
            self._check_model(s, clean["fingerprint"])
            row = new_row(clean, bytes(factors), "pending", validate_probes(probes), note, author)
            row.answer_before = answer_before
            s.add(row)
            s.flush()
            return row.id

    def record_refused(
        self, meta: dict[str, Any], reason: str, factors: bytes | None = None,
        probes: list[dict[str, Any]] | None = None, note: str | None = None,
        author: str | None = None, answer_before: str | None = None,
    ) -> int:
        """Store an edit that was refused (never applied), with the reason; return its id.

        Without factors (refused before it was computed) the meta needs only the request,
        ``layer``, ``param_name`` (may be empty), ``fingerprint`` and ``hparams``. The model
        binding is not enforced: an edit may be refused for being made for another model.
        """
        _require_text(reason, "reason")
        clean = validate_meta(meta, factors)
        with self._write.begin() as s:
            factors_b = None if factors is None else bytes(factors)
            row = new_row(clean, factors_b, "refused", validate_probes(probes), note, author)
            row.answer_before, row.refusal_reason = answer_before, reason
            s.add(row)
            s.flush()
            s.add(Event(edit_id=row.id, kind="refused", actor=author, detail=reason))
            return row.id

    def mark_applied(
        self, edit_id: int, checksum_after: str, answer_after: str | None = None,
        probes: list[dict[str, Any]] | None = None, position: int | None = None,
        actor: str | None = None, repaired: bool = False, supersedes: Sequence[int] = (),
    ) -> int:
        """Pending -> applied, appended to the applied sequence; return its position.

        ``checksum_after`` is the parameter's checksum observed after applying (stored as
        ``state_checksum``); verifying it is the service's job: a value differing from the
        computed one is logged and noted in the event. ``supersedes`` lists applied edits this
        one replaces (the service has removed them from the weights): in the same transaction
        they become 'superseded' and leave the sequence. ``position``, when given, must be
        the next free one, a guard against a second writer. ``repaired=True`` logs a
        'repaired' event instead of 'applied' (start-up recovery).
        """
        check_hex64(checksum_after, "checksum_after")
        clean_probes = None if probes is None else validate_probes(probes)
        with self._write.begin() as s:
            lock_sequence(s)  # first: two instances correcting one fact meet here, one after the other
            row = load_edit(s, edit_id, "pending")
            _refuse_unseen_conflicts(s, row, supersedes)
            for old_id in dict.fromkeys(supersedes):
                supersede_row(s, load_edit(s, old_id, "applied"), edit_id, actor)
            end = next_position(s)
            if position is not None and position != end:
                raise LedgerError(
                    f"edit #{edit_id} cannot take position {position}: {end} edits are applied, "
                    f"so it can only be appended at position {end}"
                )
            row.status, row.position, row.state_checksum = "applied", end, checksum_after
            if answer_after is not None:
                row.answer_after = answer_after
            if clean_probes is not None:
                row.probes_json = clean_probes
            detail = f"position {end}"
            if checksum_after != row.checksum_after:
                logger.warning("edit #%d: parameter checksum after applying differs from the computed one", edit_id)
                computed = _short(row.checksum_after or "")
                detail += f"; checksum {_short(checksum_after)} differs from computed {computed}"
            s.add(Event(edit_id=edit_id, kind="repaired" if repaired else "applied", actor=actor, detail=detail))
            return end

    def add_probes(self, edit_id: int, probes: list[dict[str, Any]]) -> None:
        """Append checks answered after the edit was applied (the form's checks beyond its own prompt)."""
        clean = validate_probes(probes)
        with self._write.begin() as s:
            row = s.get(Edit, edit_id)
            if row is None or row.status in ("pending", "refused"):
                raise LedgerError(f"edit #{edit_id} is not an applied edit, so no checks can be added to it")
            row.probes_json = [*(row.probes_json or []), *clean]

    def mark_failed(self, edit_id: int, reason: str, actor: str | None = None, repaired: bool = False) -> None:
        """Pending -> failed (it never took effect, or was rolled back), with the reason."""
        _require_text(reason, "reason")
        with self._write.begin() as s:
            row = load_edit(s, edit_id, "pending")
            row.status, row.refusal_reason = "failed", reason
            s.add(Event(edit_id=edit_id, kind="repaired" if repaired else "failed", actor=actor, detail=reason))

    def quarantine(self, edit_id: int, reason: str, actor: str | None = None) -> None:
        """Applied -> failed, out of the applied sequence: an edit that cannot be replayed (damaged factors).

        The row and its bytes stay for inspection; later edits move up one place, as after a revert.
        """
        _require_text(reason, "reason")
        with self._write.begin() as s:
            row = load_edit(s, edit_id, "applied")
            leave_sequence(s, row)
            row.status, row.refusal_reason = "failed", reason
            s.add(Event(edit_id=edit_id, kind="failed", actor=actor, detail=reason))
        logger.warning("quarantined edit #%d: %s", edit_id, reason)

    def discard_pending(self, edit_id: int) -> None:
        """Delete a pending row that never took effect; refused if the audit trail mentions it."""
        with self._write.begin() as s:
            load_edit(s, edit_id, "pending")
            if s.scalar(select(func.count()).select_from(Event).where(Event.edit_id == edit_id)):
                raise LedgerError(f"edit #{edit_id} has audit events and cannot be deleted; use mark_failed")
            s.execute(delete(Edit).where(Edit.id == edit_id))
        logger.info("discarded pending edit #%d", edit_id)

    def mark_reverted(self, edit_id: int, actor: str | None = None, detail: str | None = None) -> None:
        """Applied -> reverted; the edit leaves the applied sequence, later edits move up one place.

        State checksums from its old position on are cleared: the service recomputes them
        (``set_state_checksums``) after rebuilding the parameter.
        """
        with self._write.begin() as s:
            row = load_edit(s, edit_id, "applied")
            leave_sequence(s, row)
            row.status = "reverted"
            s.add(Event(edit_id=edit_id, kind="reverted", actor=actor, detail=detail))

    def mark_reapplied(
        self, edit_id: int, state_checksum: str | None = None, actor: str | None = None, detail: str | None = None,
    ) -> int:
        """Reverted or superseded -> applied, appended at the end of the sequence; return its position."""
        if state_checksum is not None:
            check_hex64(state_checksum, "state_checksum")
        with self._write.begin() as s:
            row = load_edit(s, edit_id, "reverted", "superseded")
            end = next_position(s)
            row.status, row.position, row.state_checksum, row.superseded_by = "applied", end, state_checksum, None
            s.add(Event(edit_id=edit_id, kind="reapplied", actor=actor, detail=detail or f"position {end}"))
            return end

    def supersede(self, old_id: int, new_id: int, actor: str | None = None) -> None:
        """The applied edit ``old_id`` is replaced by ``new_id`` (pending or applied).

        The old edit leaves the applied sequence as in ``mark_reverted``: the service removes
        its update from the weights.
        """
        if old_id == new_id:
            raise LedgerError(f"edit #{old_id} cannot supersede itself")
        with self._write.begin() as s:
            old = load_edit(s, old_id, "applied")
            load_edit(s, new_id, "pending", "applied")
            supersede_row(s, old, new_id, actor)

    def set_state_checksums(self, checksums: Mapping[int, str]) -> None:
        """Store the checksum of the parameter after each applied edit (after a rebuild)."""
        for edit_id, checksum in checksums.items():
            check_hex64(checksum, f"state checksum of edit #{edit_id}")
        with self._write.begin() as s:
            for edit_id, checksum in checksums.items():
                load_edit(s, edit_id, "applied").state_checksum = checksum

    def add_event(self, edit_id: int | None, kind: str, actor: str | None = None, detail: str | None = None) -> int:
        """Append to the audit trail (e.g. 'replayed', 'imported'); return the event id."""
        if kind not in EVENT_KINDS:
            raise LedgerError(f"unknown event kind {kind!r}; use one of {', '.join(EVENT_KINDS)}")
        with self._write.begin() as s:
            if edit_id is not None:
                load_edit(s, edit_id)
            event = Event(edit_id=edit_id, kind=kind, actor=actor, detail=detail)
            s.add(event)
            s.flush()
            return event.id


def _refuse_unseen_conflicts(s: Session, row: Edit, supersedes: Sequence[int]) -> None:
    """Refuse to apply ``row`` beside an applied edit of the same fact that it does not supersede.

    That edit was applied by another instance (or the CLI) after this one looked: the caller
    rebuilds its weights from the ledger, where the other correction stands.
    """
    key = (normalise(row.subject), normalise(row.relation))
    for other_id, subject, relation in s.execute(
        select(Edit.id, Edit.subject, Edit.relation).where(Edit.status == "applied")
    ):
        if other_id not in supersedes and (normalise(subject), normalise(relation)) == key:
            raise LedgerError(
                f"edit #{row.id} was not applied: edit #{other_id} corrected the same fact ({subject!r}) "
                "meanwhile, from another instance or the command line. Reload to see it, and correct it "
                "again if needed."
            )


def _require_text(value: object, field: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise LedgerError(f"{field} must be non-empty text explaining why")
