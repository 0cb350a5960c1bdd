"""The ledger's read side: look-ups that return frozen records, never ORM objects.

``LedgerReads`` is the base of ``Ledger``; each method runs in its own reading transaction
(a deferred ``BEGIN`` on SQLite, so it sees one consistent snapshot and blocks no writer).
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import URL, Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.integrity import integrity_problems
from db.records import EditRecord, EventRecord, edit_record, event_record
from db.schema import STATUSES, Edit, Event, LedgerError, MetaEntry


def normalise(text: str) -> str:
    """Case- and spacing-insensitive form of a subject or relation."""
    return " ".join(text.split()).casefold()


def load_edit(s: Session, edit_id: int, *statuses: str) -> Edit:
    """The row of ``edit_id``; with ``statuses``, it must be in one of them."""
    if isinstance(edit_id, bool) or not isinstance(edit_id, int):
        raise LedgerError(f"edit id must be an integer, got {edit_id!r}")
    row = s.get(Edit, edit_id)
    if row is None:
        raise LedgerError(f"no edit #{edit_id} in the ledger")
    if statuses and row.status not in statuses:
        raise LedgerError(f"edit #{edit_id} is {row.status}; this needs an edit that is {' or '.join(statuses)}")
    return row


class LedgerReads:
    url: URL
    _read: sessionmaker[Session]

    @property
    def model_fingerprint(self) -> str | None:
        """The fingerprint of the model this ledger belongs to (None until bound)."""
        with self._read.begin() as s:
            entry = s.get(MetaEntry, "model_fingerprint")
            return None if entry is None else entry.value

    def revision(self) -> int:
        """A counter every write transaction bumps (database triggers): a changed value means the ledger changed."""
        with self._read.begin() as s:
            entry = s.get(MetaEntry, "revision")
            return 0 if entry is None else int(entry.value)

    def highest_id(self) -> int:
        """The largest edit id in the ledger (0 when it holds none); cheap, reads no factors."""
        with self._read.begin() as s:
            return s.scalar(select(func.max(Edit.id))) or 0

    def get(self, edit_id: int) -> EditRecord:
        with self._read.begin() as s:
            return edit_record(load_edit(s, edit_id))

    def applied(self) -> list[EditRecord]:
        """Applied edits in the order they sit in the weights (by position)."""
        return self._list(select(Edit).where(Edit.status == "applied").order_by(Edit.position))

    def applied_ids(self) -> list[int]:
        """Ids of the applied edits in sequence order (a cheap check before loading their factors)."""
        with self._read.begin() as s:
            return list(s.scalars(select(Edit.id).where(Edit.status == "applied").order_by(Edit.position)))

    def pending(self) -> list[EditRecord]:
        """Edits recorded but not yet resolved (after a crash: to repair at start-up)."""
        return self._list(select(Edit).where(Edit.status == "pending").order_by(Edit.id))

    def history(self, status: str | None = None, text: str | None = None, batch: str | None = None) -> list[EditRecord]:
        """All edits, newest first; optionally of one status, of one batch and matching a case-insensitive text.

        The text is looked for in the subject, relation, target, note and author.
        """
        query = select(Edit).order_by(Edit.id.desc())
        if batch is not None and batch.strip():
            query = query.where(Edit.batch_id == batch.strip())
        if status is not None:
            if status not in STATUSES:
                raise LedgerError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
            query = query.where(Edit.status == status)
        records = self._list(query)
        if text and text.strip():
            needle = normalise(text)
            records = [
                r for r in records
                if any(needle in normalise(f or "") for f in (r.subject, r.relation, r.target, r.note, r.author))
            ]
        return records

    def events(self, edit_id: int | None = None) -> list[EventRecord]:
        """The audit trail, oldest first; optionally of one edit."""
        query = select(Event).order_by(Event.id)
        if edit_id is not None:
            query = query.where(Event.edit_id == edit_id)
        with self._read.begin() as s:
            return [event_record(e) for e in s.scalars(query)]

    def find_applied(self, subject: str, relation: str) -> list[EditRecord]:
        """Applied edits of the same fact: subject and relation equal up to case and spacing."""
        key = (normalise(subject), normalise(relation))
        return [r for r in self.applied() if (normalise(r.subject), normalise(r.relation)) == key]

    def is_duplicate(self, meta: dict[str, Any], factors_sha256: str) -> bool:
        """Whether a live edit (not refused or failed) has this subject, relation, target, layer and factors."""
        try:
            subject, relation, target, layer = meta["subject"], meta["relation"], meta["target"], meta["layer"]
        except (KeyError, TypeError) as err:
            raise LedgerError(f"meta needs subject, relation, target and layer to detect duplicates: {err!r}") from err
        query = select(Edit.id).where(
            Edit.factors_sha256 == factors_sha256, Edit.status.not_in(("refused", "failed")),
            Edit.subject == subject, Edit.relation == relation, Edit.target == target, Edit.layer == layer,
        )
        with self._read.begin() as s:
            return s.scalars(query.limit(1)).first() is not None

    def integrity_check(self) -> list[str]:
        """Problems found in the stored data, one line each; an empty list means none."""
        with self._read.begin() as s:
            return integrity_problems(s, sqlite=self.url.get_backend_name() == "sqlite")

    def _list(self, query: Select[tuple[Edit]]) -> list[EditRecord]:
        with self._read.begin() as s:
            return [edit_record(row) for row in s.scalars(query)]
