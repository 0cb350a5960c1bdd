"""Export and import of ledger edits through the service (import applies them to the model)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chat_app.service import EditService
from db import export_edits, read_export
from db.schema import LedgerError
from editing.fact_payload import decode_payload


@dataclass(frozen=True)
class ImportReport:
    imported: tuple[int, ...]  # new ledger ids
    skipped: int  # duplicates of edits already in the ledger
    ignored: int  # edits that were not applied in the source ledger


def export_file(service: EditService, path: str | Path, ids: list[int] | None = None) -> int:
    """Write the applied edits (or ``ids``) to one file; return how many were written."""
    return export_edits(service.ledger, path, ids)


def import_file(service: EditService, path: str | Path, actor: str | None = None) -> ImportReport:
    """Apply the applied edits of an export file, in their order, skipping duplicates.

    The whole file is validated first; a file for another model is refused before anything changes.
    """
    service._writable()  # noqa: SLF001 - the read-only guard is the service's
    bundle = read_export(path)
    if bundle.model_fingerprint not in (None, service.editor.fingerprint):
        raise LedgerError(
            f"this export was made for another model ({bundle.model_fingerprint[:12]}…); "
            f"the loaded model is {service.editor.fingerprint[:12]}…"
        )
    wanted = [e for e in bundle.edits if e.status == "applied"]
    edits = [(e, decode_payload(e.meta, e.factors)) for e in wanted]
    fresh = [(e, edit) for e, edit in edits if not service.ledger.is_duplicate(e.meta, e.factors_sha256)]
    imported = service.import_edits([(e.meta, e.factors, list(e.probes), e.note, e.author or actor, e.answer_before,
                                      e.answer_after, edit) for e, edit in fresh], actor=actor)  # fmt: skip
    return ImportReport(tuple(imported), len(edits) - len(fresh), len(bundle.edits) - len(wanted))
