"""Tables of the edit ledger and the schema-version check made when a ledger is opened.

Three tables: ``edits`` (one row per edit, with its rank-one factors as bytes), ``events``
(an append-only audit trail) and ``meta`` (key/value: ``schema_version``, ``model_fingerprint``).
The ledger stores bytes and JSON only; it knows nothing of tensors.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    inspect,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 1

STATUSES = ("pending", "applied", "reverted", "superseded", "refused", "failed")
EVENT_KINDS = (
    "applied", "reverted", "reapplied", "superseded", "replayed",
    "imported", "refused", "failed", "repaired",
)


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
    meta_json: Mapped[str] = mapped_column(Text)  # the whole payload meta, hparams included
    hparams_json: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    checksum_before: Mapped[str | None] = mapped_column(String(64))
    checksum_after: Mapped[str | None] = mapped_column(String(64))
    # Checksum of the parameter after this edit at its place in the applied sequence.
    state_checksum: Mapped[str | None] = mapped_column(String(64))
    probes_json: Mapped[str] = mapped_column(Text, default="[]")
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("edits.id"))
    position: Mapped[int | None] = mapped_column(Integer, index=True)
    note: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(256))
    refusal_reason: Mapped[str | None] = mapped_column(Text)  # why refused, or why it failed


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
    """Create the tables of a new ledger, or check that an existing one has our schema version.

    Raises ``LedgerError`` (before touching anything) for a ledger of another version or a
    database that holds an ``edits`` table but no version.
    """
    tables = set(inspect(engine).get_table_names())
    if "meta" in tables:
        with Session(engine) as session:
            stored = session.get(MetaEntry, "schema_version")
        if stored is not None:
            _check_version(stored.value, where)
    elif "edits" in tables:
        raise LedgerError(
            f"{where} has an 'edits' table but no schema version: it was not made by this program. "
            "Start with another --db path."
        )
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        if session.get(MetaEntry, "schema_version") is None:
            session.add(MetaEntry(key="schema_version", value=str(SCHEMA_VERSION)))


def _check_version(value: str, where: str) -> None:
    try:
        version = int(value)
    except ValueError:
        version = None
    if version == SCHEMA_VERSION:
        return
    if version is not None and version > SCHEMA_VERSION:
        hint = "It was written by a newer version of this program: upgrade the program"
    else:
        hint = "Open it with the program version that created it and export its edits"
    raise LedgerError(
        f"ledger {where} has schema version {value!r}, but this program reads version "
        f"{SCHEMA_VERSION}. {hint}, or start a new ledger with another --db path "
        "(edits can be moved with export and import)."
    )

