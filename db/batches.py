"""The ledger's many-row writes, each one transaction: a MEMIT batch's facts recorded, reverted or
re-applied; edits imported from a file recorded.

Each fact of a batch is an edit of its own (its own row, factors and audit trail); the batch
columns (``batch_id``, ``batch_index``, ``batch_size``, from the fact's meta) group them. Every
method here is one transaction: all the facts change, or none do.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.queries import load_edit
from db.records import EditRecord, check_hex64, edit_record, validate_meta, validate_probes
from db.schema import Edit, Event, LedgerError
from db.sequence import leave_sequence, lock_sequence, new_row, next_position, supersede_row


class LedgerBatches:
    """Mixed into ``Ledger``, which sets up the sessions and the model check declared here."""

    _write: sessionmaker[Session]
    _read: sessionmaker[Session]

    def _check_model(self, s: Session, fingerprint: str) -> None:  # pragma: no cover - Ledger's
        raise NotImplementedError

    def batch(self, batch_id: str) -> list[EditRecord]:
        """The facts of one batch, in batch order (empty if there is no such batch)."""
        with self._read.begin() as s:
            query = select(Edit).where(Edit.batch_id == batch_id).order_by(Edit.batch_index, Edit.id)
            return [edit_record(row) for row in s.scalars(query)]

    def record_batch(
        self, entries: Sequence[Mapping[str, Any]], *, supersedes: Sequence[int] = (), actor: str | None = None,
        refused: str | None = None,
    ) -> list[int]:
        """Record a batch's facts, already applied to the weights, in order, as one transaction; return their ids.

        Each entry: ``meta`` and ``factors`` (required; the meta's ``stats.batch`` names the batch),
        ``probes``, ``note``, ``author``, ``answer_before``, ``answer_after``, ``state_checksum``.
        ``supersedes``: applied edits of the same facts, which the caller removed from the weights;
        they become 'superseded' (by the fact of their subject and relation). An applied edit of one
        of the facts that is not in ``supersedes`` (another instance made it meanwhile) refuses the
        whole batch. With ``refused`` (the reason), the facts are recorded as refused instead.
        """
        rows = [_batch_row(i, entry, refused) for i, entry in enumerate(entries)]
        if not rows or len({r.batch_id for r in rows}) != 1 or rows[0].batch_id is None:
            raise LedgerError("a batch needs at least one fact, all carrying the same batch id in meta['stats']['batch']")
        with self._write.begin() as s:
            if refused is None:
                lock_sequence(s)
                _refuse_unseen(s, rows, supersedes)
            states = [row.state_checksum for row in rows]
            for row in rows:  # ids first: the superseded edits name their successors
                row.state_checksum = None
                if refused is None:
                    self._check_model(s, row.fingerprint)
                s.add(row)
                s.flush()
            if refused is None:
                _supersede(s, rows, supersedes, actor)  # before the new facts take their places (as mark_applied)
            for row, state in zip(rows, states):
                if refused is None:
                    row.position, row.state_checksum = next_position(s), state
                    s.flush()
                where = f"batch {row.batch_id}, fact {(row.batch_index or 0) + 1} of {row.batch_size}"
                detail = f"{refused}; {where}" if refused else f"position {row.position}; {where}"
                s.add(Event(edit_id=row.id, kind="refused" if refused else "applied", actor=actor, detail=detail))
            return [row.id for row in rows]

    def record_imported(self, entries: Sequence[Mapping[str, Any]], actor: str | None = None) -> list[int]:
        """Record edits already applied to the weights, in order, as one transaction; return their ids.

        Each entry: ``meta`` and ``factors`` (required), ``probes``, ``note``, ``author``,
        ``answer_before``, ``answer_after``, ``state_checksum`` (optional). All or none are
        recorded; each gets an 'imported' event. Duplicates are the caller's to skip
        (``is_duplicate``).
        """
        rows = [_imported_row(i, entry) for i, entry in enumerate(entries)]
        with self._write.begin() as s:
            for row in rows:
                self._check_model(s, row.fingerprint)
                row.position = next_position(s)
                s.add(row)
                s.flush()
                s.add(Event(edit_id=row.id, kind="imported", actor=actor, detail=f"position {row.position}"))
            return [row.id for row in rows]

    def mark_reverted_many(self, edit_ids: Sequence[int], actor: str | None = None, detail: str | None = None) -> None:
        """Applied -> reverted for every edit of ``edit_ids``, in one transaction (see ``mark_reverted``)."""
        with self._write.begin() as s:
            for edit_id in dict.fromkeys(edit_ids):
                row = load_edit(s, edit_id, "applied")
                leave_sequence(s, row)
                row.status = "reverted"
                s.add(Event(edit_id=edit_id, kind="reverted", actor=actor, detail=detail))

    def mark_reapplied_many(
        self, checksums: Mapping[int, str | None], actor: str | None = None, detail: str | None = None
    ) -> None:
        """Reverted or superseded -> applied for each id of ``checksums`` (in that order, at the end), in one transaction."""
        for checksum in checksums.values():
            if checksum is not None:
                check_hex64(checksum, "state_checksum")
        with self._write.begin() as s:
            for edit_id, checksum in checksums.items():
                row = load_edit(s, edit_id, "reverted", "superseded")
                end = next_position(s)
                row.status, row.position, row.state_checksum, row.superseded_by = "applied", end, checksum, None
                s.add(Event(edit_id=edit_id, kind="reapplied", actor=actor, detail=detail or f"position {end}"))
                s.flush()


def _batch_row(i: int, entry: Mapping[str, Any], refused: str | None) -> Edit:
    if not isinstance(entry, Mapping) or "meta" not in entry or entry.get("factors") is None:
        raise LedgerError(f"fact {i} of the batch needs 'meta' and 'factors'")
    try:
        clean = validate_meta(entry["meta"], entry["factors"])
        row = new_row(clean, bytes(entry["factors"]), "refused" if refused else "applied",
                      validate_probes(entry.get("probes")), entry.get("note"), entry.get("author"))  # fmt: skip
        state = entry.get("state_checksum")
        row.state_checksum = None if state is None or refused else check_hex64(state, "state_checksum")
    except LedgerError as err:
        raise LedgerError(f"fact {i} of the batch: {err}") from err
    row.answer_before, row.answer_after, row.refusal_reason = entry.get("answer_before"), entry.get("answer_after"), refused
    return row


def _key(subject: str, relation: str) -> tuple[str, str]:
    return " ".join(subject.split()).casefold(), " ".join(relation.split()).casefold()


def _refuse_unseen(s: Session, rows: Sequence[Edit], supersedes: Sequence[int]) -> None:
    """An applied edit of one of the facts that the caller did not see (not in ``supersedes``) refuses the batch."""
    keys = {_key(r.subject, r.relation) for r in rows}
    for other_id, subject, relation in s.execute(
        select(Edit.id, Edit.subject, Edit.relation).where(Edit.status == "applied")
    ):
        if other_id not in supersedes and _key(subject, relation) in keys:
            raise LedgerError(
                f"the batch was not applied: edit #{other_id} corrected the same fact ({subject!r}) meanwhile, "
                "from another instance or the command line. Reload to see it, and apply the batch again if needed."
            )


def _supersede(s: Session, rows: Sequence[Edit], supersedes: Sequence[int], actor: str | None) -> None:
    by_key = {_key(r.subject, r.relation): r.id for r in rows}
    for old_id in dict.fromkeys(supersedes):
        old = load_edit(s, old_id, "applied")
        new_id = by_key.get(_key(old.subject, old.relation))
        if new_id is None:
            raise LedgerError(f"edit #{old_id} is not a fact of this batch, so the batch cannot supersede it")
        supersede_row(s, old, new_id, actor)


def _imported_row(i: int, entry: Mapping[str, Any]) -> Edit:
    """A validated 'applied' row (position still unset) from one ``record_imported`` entry."""
    if not isinstance(entry, Mapping) or "meta" not in entry or entry.get("factors") is None:
        raise LedgerError(f"imported edit {i} needs 'meta' and 'factors'")
    try:
        clean = validate_meta(entry["meta"], entry["factors"])
        state = entry.get("state_checksum")
        row = new_row(clean, bytes(entry["factors"]), "applied", validate_probes(entry.get("probes")),
                      entry.get("note"), entry.get("author"))
        row.state_checksum = None if state is None else check_hex64(state, "state_checksum")
    except LedgerError as err:
        raise LedgerError(f"imported edit {i}: {err}") from err
    row.answer_before, row.answer_after = entry.get("answer_before"), entry.get("answer_after")
    return row
