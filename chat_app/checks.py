"""Checks of the served model against its ledger: do the applied edits still hold, do weights and ledger agree."""
from __future__ import annotations

from typing import Any

from chat_app.locks import RWLock
from chat_app.probes import answer, holds
from chat_app.results import VerifyItem
from db import Ledger
from editing import RomeEditor
from editing.fact_payload import Applied


class LedgerChecks:
    """Mixed into ``EditService``: the state it declares is set up by the service."""

    editor: RomeEditor
    ledger: Ledger
    weights: RWLock
    _edits: dict[int, Applied]
    model: Any
    tok: Any

    def verify(self) -> list[VerifyItem]:
        """Re-run every applied edit's probes on the current model: which still hold."""
        items = []
        with self.weights.read():
            for record in self.ledger.applied():
                probes = []
                for probe in record.probes or ({"prompt": record.subject and record.relation.replace("{}", record.subject),
                                                "kind": "edited", "expected": record.target},):  # fmt: skip
                    now = answer(self.model, self.tok, probe["prompt"], probe["kind"])
                    probes.append({**probe, "now": now, "holds": holds(probe["kind"], probe["expected"], now)})
                items.append(VerifyItem(record.id, record.subject, record.relation, record.target, tuple(probes)))
        return items

    def integrity_problems(self) -> list[str]:
        """Weights against ledger: same applied sequence, and each stored state checksum reproduced."""
        problems = []
        with self.weights.read():
            records = self.ledger.applied()
            order = self._applied_ids()  # type: ignore[attr-defined]  # LedgerSync's, mixed in beside
            if order != [r.id for r in records]:
                problems.append(f"weights hold edits {order} but the ledger's applied sequence is {[r.id for r in records]}")
            for record, (_, checksum) in zip(records, self._state_checksums()):  # type: ignore[attr-defined]
                if record.state_checksum is None:
                    problems.append(f"edit #{record.id}: no parameter checksum is stored, so its state cannot be verified")
                elif record.state_checksum != checksum:
                    problems.append(f"edit #{record.id}: parameter checksum {str(checksum)[:12]}… differs from the stored one")
        return problems
