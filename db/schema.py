"""Tables of the edit ledger and the schema-version check made when a ledger is opened.

Three tables: ``edits`` (one row per edit, with its rank-one factors as bytes), ``events``
(an append-only audit trail) and ``meta`` (key/value: ``schema_version``, ``model_fingerprint``).
The ledger stores bytes and JSON only; it knows nothing of tensors.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 2  # meta.schema_version; the schema itself is Alembic's (db/migrations)

STATUSES = ("pending", "applied", "reverted", "superseded", "refused", "failed")
EVENT_KINDS = (
    "applied", "reverted", "reapplied", "superseded", "replayed",
    "imported", "refused", "failed", "repaired",
)


# JSON columns: JSONB on PostgreSQL, JSON text elsewhere. Values are dicts and lists, never text.
JSONValue = JSON().with_variant(JSONB(), "postgresql")


class LedgerError(ValueError):
    """The ledger cannot do what was asked; the message says why and what to do."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: SQLite keeps no time zone, so we fix one."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("datetimes stored in the ledger must carry a time zone")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    pass


class Edit(Base):
    """One edit. Invariant: ``position`` is set iff ``status == 'applied'``; positions are 0..n-1."""

    __tablename__ = "edits"
    __table_args__ = (CheckConstraint(_one_of("status", STATUSES), name="edit_status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), index=True)
    subject: Mapped[str] = mapped_column(Text)
    relation: Mapped[str] = mapped_column(Text)  # template with one "{}" for the subject
    target: Mapped[str] = mapped_column(Text)
    answer_before: Mapped[str | None] = mapped_column(Text)
    answer_after: Mapped[str | None] = mapped_column(Text)
    layer: Mapped[int] = mapped_column(Integer)
    param_name: Mapped[str] = mapped_column(String(256))
    # A refused edit may have been refused before its factors existed: factors are then NULL.
    factors: Mapped[bytes | None] = mapped_column(LargeBinary)
    factors_sha256: Mapped[str | None] = mapped_column(String(64))
    meta_json: Mapped[Any] = mapped_column(JSONValue)  # the whole payload meta, hparams included
    hparams_json: Mapped[Any] = mapped_column(JSONValue)
    fingerprint: Mapped[str] = mapped_column(String(64))
    checksum_before: Mapped[str | None] = mapped_column(String(64))
    checksum_after: Mapped[str | None] = mapped_column(String(64))
    # Checksum of the parameter after this edit at its place in the applied sequence.
    state_checksum: Mapped[str | None] = mapped_column(String(64))
    probes_json: Mapped[Any] = mapped_column(JSONValue, default=list)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("edits.id"))
    position: Mapped[int | None] = mapped_column(Integer, index=True)
    note: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(256))
    refusal_reason: Mapped[str | None] = mapped_column(Text)  # why refused, or why it failed
    # A fact edited in a MEMIT batch: the batch, the fact's place in it, and how many facts it had (else NULL).
    batch_id: Mapped[str | None] = mapped_column(String(32), index=True)
    batch_index: Mapped[int | None] = mapped_column(Integer)
    batch_size: Mapped[int | None] = mapped_column(Integer)


class Event(Base):
    """One line of the audit trail; rows are only ever inserted."""

    __tablename__ = "events"
    __table_args__ = (CheckConstraint(_one_of("kind", EVENT_KINDS), name="event_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    edit_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(String(256))
    detail: Mapped[str | None] = mapped_column(Text)


class MetaEntry(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def prepare_schema(engine: Engine, where: str) -> None:
    """Create a new ledger, or bring an existing one to the current schema (Alembic: ``db.migrate``).

    Raises ``LedgerError`` (before touching anything) for a ledger of an unknown (newer) revision
    or a database that holds an ``edits`` table but no version.
    """
    from db.migrate import upgrade_schema  # db.migrate imports this module

    upgrade_schema(engine, where)
