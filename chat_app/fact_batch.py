"""Apply the facts of a file through the service: every fact checked first, then applied one by one."""
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
    status: str  # "applied", "would apply" (dry run) or "refused"
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        r = self.fact.request
        return {"line": self.line, "subject": r.subject, "relation": r.relation, "target": r.target,
                "layer": r.layer, "edit_id": self.edit_id, "status": self.status, "detail": self.detail}  # fmt: skip


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
    on_fact: Callable[[int, int], None] | None = None,
) -> list[FactOutcome]:
    """Check every fact, then (unless ``dry_run``) apply them in file order; a refused fact does not stop the rest."""
    check_facts(service, facts)
    if dry_run:
        return [FactOutcome(f.line, f, None, "would apply") for f in facts]
    outcomes = []
    for i, fact in enumerate(facts):
        try:
            result = service.apply(fact.request, paraphrases=list(fact.paraphrases), neighbours=list(fact.neighbours),
                                   note=note)  # fmt: skip
            outcomes.append(FactOutcome(fact.line, fact, result.edit_id, "applied"))
        except ValueError as err:
            log.warning("line %d refused: %s", fact.line, err)
            outcomes.append(FactOutcome(fact.line, fact, None, "refused", str(err)))
        if on_fact is not None:
            on_fact(i + 1, len(facts))
    return outcomes
