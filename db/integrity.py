"""Consistency checks over a ledger's stored data, each problem reported as one line of text.

Checked: the database file itself (SQLite ``PRAGMA integrity_check``), each edit's factors
against their SHA-256, the dense applied sequence (positions 0..n-1, set iff applied),
dangling references (events and ``superseded_by`` naming missing edits), undecodable JSON,
and edits made for a model other than the ledger's.
"""
from __future__ import annotations

import json
from collections import Counter

from sqlalchemy import Text, cast, select, text
from sqlalchemy.orm import Session, defer

from db.records import sha256_hex
from db.schema import Edit, Event, MetaEntry


def integrity_problems(s: Session, sqlite: bool) -> list[str]:
    problems: list[str] = []
    if sqlite:
        rows = [r[0] for r in s.execute(text("PRAGMA integrity_check"))]
        if rows != ["ok"]:
            problems += [f"sqlite integrity_check: {r}" for r in rows]
    json_columns = (Edit.meta_json, Edit.hparams_json, Edit.probes_json)
    edits = list(s.scalars(select(Edit).options(*(defer(c) for c in json_columns)).order_by(Edit.id)))
    ids = {e.id for e in edits}
    problems += _json_problems(s, json_columns)
    entry = s.get(MetaEntry, "model_fingerprint")
    for e in edits:
        problems += _row_problems(e, ids, None if entry is None else entry.value)
    problems += _sequence_problems(edits)
    for event in s.scalars(select(Event).where(Event.edit_id.is_not(None)).order_by(Event.id)):
        if event.edit_id not in ids:
            problems.append(f"event #{event.id} ({event.kind}) refers to missing edit #{event.edit_id}")
    return problems


def _row_problems(e: Edit, ids: set[int], model: str | None) -> list[str]:
    problems = []
    if e.factors is None:
        if e.status != "refused":
            problems.append(f"edit #{e.id} ({e.status}) has no factors")
    elif e.factors_sha256 != sha256_hex(bytes(e.factors)):
        problems.append(f"edit #{e.id}: factors do not match their sha256 (stored blob altered or corrupt)")
    if e.status == "superseded" and e.superseded_by is None:
        problems.append(f"edit #{e.id} is superseded but names no successor")
    if e.superseded_by is not None and e.superseded_by not in ids:
        problems.append(f"edit #{e.id} is superseded by missing edit #{e.superseded_by}")
    if model is not None and e.fingerprint != model and e.status in ("pending", "applied"):
        problems.append(f"edit #{e.id} ({e.status}) was made for model {e.fingerprint[:12]}…, not {model[:12]}…")
    return problems


def _json_problems(s: Session, columns: tuple) -> list[str]:  # type: ignore[type-arg]
    """JSON columns read as stored text, so that one undecodable value cannot stop the check."""
    problems = []
    for row in s.execute(select(Edit.id, *(cast(c, Text) for c in columns)).order_by(Edit.id)):
        for column, raw in zip(columns, row[1:]):
            try:
                json.loads(raw)
            except (TypeError, ValueError):
                problems.append(f"edit #{row[0]}: {column.key} is not valid JSON")
    return problems


def _sequence_problems(edits: list[Edit]) -> list[str]:
    problems = []
    positions = []
    for e in edits:
        if e.status == "applied" and e.position is None:
            problems.append(f"edit #{e.id} is applied but has no position")
        elif e.status != "applied" and e.position is not None:
            problems.append(f"edit #{e.id} is {e.status} but holds position {e.position}")
        elif e.position is not None:
            positions.append(e.position)
    counts = Counter(positions)
    for position, n in sorted(counts.items()):
        if n > 1:
            holders = sorted(e.id for e in edits if e.position == position)
            problems.append(f"position {position} is held by {n} applied edits: {holders}")
    if sorted(counts) != list(range(len(counts))):
        problems.append(f"applied positions are not 0..{len(counts) - 1}: {sorted(counts)}")
    return problems
