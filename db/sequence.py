"""Row-level steps shared by the ledger's writes: new rows, and the dense applied sequence.

Invariant kept here: applied edits hold positions 0..n-1 and no other edit holds one.
Every function runs inside the caller's transaction.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.records import batch_fields, factor_parts, sha256_hex
from db.schema import Edit, Event, MetaEntry


def lock_sequence(s: Session) -> None:
    """Serialise writers that reorder the sequence.

    Postgres & co. lock a known row; SQLite already holds the write lock from BEGIN IMMEDIATE.
    """
    s.execute(select(MetaEntry).where(MetaEntry.key == "schema_version").with_for_update())


def next_position(s: Session) -> int:
    lock_sequence(s)
    top = s.scalar(select(func.max(Edit.position)).where(Edit.status == "applied"))
    return 0 if top is None else top + 1


def leave_sequence(s: Session, row: Edit) -> None:
    """Take ``row`` out of the sequence; later edits move up one place.

    The state checksums of later edits of the parameters it changes (a batch fact may change
    several) are cleared: those parameters' states after each of them change, and the service
    stores the new ones after its rebuild (``set_state_checksums``). Later edits of other
    parameters keep theirs: their states do not change.
    """
    lock_sequence(s)
    removed, row.position, row.state_checksum = row.position, None, None
    s.flush()
    if removed is not None:
        later = Edit.position > removed
        names = {row.param_name} | {str(p["param_name"]) for p in factor_parts(row.meta_json)}
        s.execute(
            update(Edit).where(later, Edit.param_name.in_(names)).values(state_checksum=None)
            .execution_options(synchronize_session="fetch")
        )
        s.execute(
            update(Edit).where(later).values(position=Edit.position - 1)
            .execution_options(synchronize_session="fetch")
        )


def supersede_row(s: Session, old: Edit, new_id: int, actor: str | None) -> None:
    leave_sequence(s, old)
    old.status, old.superseded_by = "superseded", new_id
    s.add(Event(edit_id=old.id, kind="superseded", actor=actor, detail=f"by edit #{new_id}"))


def new_row(
    meta: dict[str, Any], factors: bytes | None, status: str, probes: list[dict[str, Any]],
    note: str | None, author: str | None,
) -> Edit:
    """An edit row from validated meta (see ``validate_meta``); a batch fact's batch columns come from its meta."""
    batch_id, batch_index, batch_size = batch_fields(meta)
    return Edit(
        batch_id=batch_id, batch_index=batch_index, batch_size=batch_size,
        status=status, subject=meta["subject"], relation=meta["relation"], target=meta["target"],
        layer=meta["layer"], param_name=meta["param_name"], factors=factors,
        factors_sha256=None if factors is None else sha256_hex(factors),
        meta_json=meta, hparams_json=meta["hparams"], fingerprint=meta["fingerprint"],
        checksum_before=meta.get("checksum_before"), checksum_after=meta.get("checksum_after"),
        probes_json=probes, note=note, author=author,
    )
