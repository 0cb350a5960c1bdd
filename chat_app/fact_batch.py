"""Apply the facts of a file through the service: every fact checked first, then applied one by one or as one MEMIT batch."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chat_app.fact_file import FileFact
from chat_app.service import EditService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FactOutcome:
    line: int
    fact: FileFact
    edit_id: int | None  # None: not applied
    status: str  # "applied", "applied, not holding", "would apply" (dry run) or "refused"
    detail: str = ""
    batch_id: str | None = None
    before: str | None = None  # the fact's own prompt answered before and after
    after: str | None = None

    def to_dict(self) -> dict[str, Any]:
        r = self.fact.request
        return {"line": self.line, "subject": r.subject, "relation": r.relation, "target": r.target,
                "layer": r.layer, "edit_id": self.edit_id, "status": self.status, "detail": self.detail,
                "batch_id": self.batch_id, "before": self.before, "after": self.after}  # fmt: skip


def check_facts(service: EditService, facts: list[FileFact]) -> None:
    """Raise ``ValueError`` naming every fact the model cannot take (layer range, tokenisation) before any is applied."""
    problems = []
    for fact in facts:
        try:
            service.editor.validate(fact.request)
        except ValueError as err:
            problems.append(f"line {fact.line}: {err}")
    if problems:
        raise ValueError(f"the file is refused, nothing applied: {'; '.join(problems)}")


def apply_facts(
    service: EditService, facts: list[FileFact], *, dry_run: bool = False, note: str | None = None,
    on_fact: Callable[[int, int], None] | None = None, author: str | None = None,
) -> list[FactOutcome]:
    """Check every fact, then (unless ``dry_run``) apply them in file order; a refused fact does not stop the rest."""
    check_facts(service, facts)
    if dry_run:
        return [FactOutcome(f.line, f, None, "would apply") for f in facts]
    outcomes = []
    for i, fact in enumerate(facts):
        try:
            result = service.apply(fact.request, paraphrases=list(fact.paraphrases), neighbours=list(fact.neighbours),
                                   note=note, author=author)  # fmt: skip
            outcomes.append(FactOutcome(fact.line, fact, result.edit_id, "applied"))
        except ValueError as err:
            log.warning("line %d refused: %s", fact.line, err)
            outcomes.append(FactOutcome(fact.line, fact, None, "refused", str(err)))
        if on_fact is not None:
            on_fact(i + 1, len(facts))
    return outcomes


def apply_facts_batch(
    service: EditService, facts: list[FileFact], *, dry_run: bool = False, note: str | None = None,
    progress: Callable[[str, float], None] | None = None, author: str | None = None,
) -> list[FactOutcome]:
    """Check every fact, then (unless ``dry_run``) apply them all as one MEMIT batch: all recorded, or none.

    A refused batch (bad input, a non-finite or outlier update) raises ``ValueError``; nothing is applied.
    """
    check_facts(service, facts)
    if dry_run:
        return [FactOutcome(f.line, f, None, "would apply") for f in facts]
    result = service.apply_batch([f.request for f in facts], checks=[(f.paraphrases, f.neighbours) for f in facts],
                                 note=note, author=author, progress=progress)  # fmt: skip
    outcomes = []
    for fact, record, probes in zip(facts, result.records, result.probes):
        status = "applied, not holding" if record.not_holding else "applied"
        outcomes.append(FactOutcome(fact.line, fact, record.id, status, "", result.batch_id,
                                    probes[0].before if probes else None, probes[0].after if probes else None))  # fmt: skip
    return outcomes
