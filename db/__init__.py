"""The edit ledger: a durable, auditable record of every edit made to one model.

Stores bytes and JSON only (SQLAlchemy + the standard library); it never imports torch.
"""
from db.engine import resolve_url, to_url
from db.ledger import Ledger
from db.records import EditRecord, EventRecord
from db.schema import EVENT_KINDS, SCHEMA_VERSION, STATUSES, LedgerError
from db.transfer import ExportBundle, ExportedEdit, export_edits, read_export

__all__ = [
    "EVENT_KINDS", "SCHEMA_VERSION", "STATUSES", "EditRecord", "EventRecord", "ExportBundle",
    "ExportedEdit", "Ledger", "LedgerError", "export_edits", "read_export", "resolve_url", "to_url",
]
