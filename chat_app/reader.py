"""The ledger's read side without a model: ``history`` and the edit-pack ``export`` need no weights.

Opening the ledger alone (no torch import, no model load) lets these commands return in about a second.
"""
from __future__ import annotations

from pathlib import Path

from chat_app.settings import Settings, ledger_url
from db import EditRecord, Ledger, export_edits


class LedgerReader:
    """What ``EditService`` offers for reading, over the ledger alone."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @classmethod
    def open(cls, settings: Settings) -> LedgerReader:
        return cls(Ledger.open(ledger_url(settings)))

    def history(self, status: str | None = None, text: str | None = None, batch: str | None = None) -> list[EditRecord]:
        return self.ledger.history(status=status or None, text=text or None, batch=batch or None)

    def export_edits(self, path: str | Path, ids: list[int] | None = None) -> int:
        """Write the applied edits (or ``ids``) to one file; return how many were written."""
        return export_edits(self.ledger, path, ids)
