"""Edit-evaluation cases read from CounterFact (original and flat forms) and zsRE (MEND form).

Every record becomes one frozen ``Case``. A bad or partial record is logged with its index and
reason, counted in the ``Skipped`` report, and left out; it never stops the run.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing.request import EditRequest

log = logging.getLogger(__name__)

COUNTERFACT, ZSRE = "counterfact", "zsre"


@dataclass(frozen=True)
class Case:
    """One edit ``relation.format(subject) -> target_new`` with the prompts that measure it."""

    case_id: int | str
    subject: str
    relation: str  # template with one "{}" where the subject goes
    target_new: str  # the object the edit writes in
    target_true: str  # the object the model should hold before the edit
    paraphrases: tuple[str, ...]  # rephrasings of the prompt (generalisation)
    neighbourhood: tuple[str, ...]  # prompts about other subjects (specificity)
    neighbourhood_answer: str  # their true object
    generation_prompts: tuple[str, ...]  # prefixes for the fluency test; empty means "use the prompt"
    kind: str  # COUNTERFACT or ZSRE

    @property
    def prompt(self) -> str:
        return self.relation.replace("{}", self.subject)

    def request(self, layer: int | None = None) -> EditRequest:
        return EditRequest(self.subject, self.relation, self.target_new, layer)


@dataclass
class Skipped:
    """Records left out while reading: ``(index, reason)`` each, and counts by reason."""

    records: list[tuple[int, str]] = field(default_factory=list)

    def add(self, index: int, reason: str) -> None:
        log.warning("skipping record %d: %s", index, reason)
        self.records.append((index, reason))

    @property
    def count(self) -> int:
        return len(self.records)

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.records))


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is missing or not text")
    return value.strip()


def _texts(value: object, key: str) -> tuple[str, ...]:
    """A string or a list of strings (either appears in the wild) as a tuple; absent is empty."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
        raise ValueError(f"'{key}' must be text or a list of texts")
    return tuple(t.strip() for t in items if t.strip())


def _first_text(value: object, key: str) -> str:
    """The first of a string-or-list answer field (a target dict ``{"str": ...}`` also counts)."""
    if isinstance(value, dict):
        value = value.get("str")
    texts = _texts(value, key)
    if not texts:
        raise ValueError(f"'{key}' is missing or empty")
    return texts[0]


def _template(prompt: str, subject: str, key: str) -> str:
    if subject not in prompt:
        raise ValueError(f"the subject does not occur in '{key}'")
    return prompt.replace(subject, "{}", 1)


def _counterfact_original(record: dict[str, Any], index: int) -> Case:
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise ValueError("'requested_rewrite' is missing or not an object")
    true = _first_text(rewrite.get("target_true"), "target_true")
    return Case(
        case_id=record.get("case_id", index),
        subject=_text(rewrite, "subject"),
        relation=_text(rewrite, "prompt"),
        target_new=_first_text(rewrite.get("target_new"), "target_new"),
        target_true=true,
        paraphrases=_texts(record.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighbourhood=_texts(record.get("neighborhood_prompts"), "neighborhood_prompts"),
        neighbourhood_answer=true,
        generation_prompts=_texts(record.get("generation_prompts"), "generation_prompts"),
        kind=COUNTERFACT,
    )


def _counterfact_flat(record: dict[str, Any], index: int) -> Case:
    subject = _text(record, "subject")
    true = _first_text(record.get("ground_truth"), "ground_truth")
    neighbourhood = _texts(record.get("locality_prompt"), "locality_prompt")
    answer = record.get("locality_ground_truth")
    return Case(
        case_id=record.get("case_id", index),
        subject=subject,
        relation=_template(_text(record, "prompt"), subject, "prompt"),
        target_new=_first_text(record.get("target_new"), "target_new"),
        target_true=true,
        paraphrases=_texts(record.get("rephrase_prompt"), "rephrase_prompt"),
        neighbourhood=neighbourhood,
        # CounterFact's neighbours share the case's true object; fall back to it when unstated.
        neighbourhood_answer=_first_text(answer, "locality_ground_truth") if answer is not None else true,
        generation_prompts=(),
        kind=COUNTERFACT,
    )


def _zsre(record: dict[str, Any], index: int) -> Case:
    subject = _text(record, "subject")
    return Case(
        case_id=record.get("case_id", index),
        subject=subject,
        relation=_template(_text(record, "src"), subject, "src"),
        target_new=_first_text(record.get("alt"), "alt"),
        target_true=_first_text(record.get("answers"), "answers"),
        paraphrases=_texts(record.get("rephrase"), "rephrase"),
        neighbourhood=_texts(record.get("loc"), "loc")[:1],
        neighbourhood_answer=_first_text(record.get("loc_ans"), "loc_ans"),
        generation_prompts=(),
        kind=ZSRE,
    )


_READERS: dict[str, Callable[[dict[str, Any], int], Case]] = {
    "counterfact (original)": _counterfact_original,
    "zsre": _zsre,
    "counterfact (flat)": _counterfact_flat,
}


def _format_of(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    if "requested_rewrite" in record:
        return "counterfact (original)"
    if "src" in record or "alt" in record:
        return "zsre"
    if "prompt" in record or "target_new" in record:
        return "counterfact (flat)"
    return None


def detect_format(records: Sequence[object]) -> str:
    """The format most records look like, so one partial record is judged by its file's format."""
    votes = Counter(f for r in records if (f := _format_of(r)) is not None)
    if not votes:
        raise ValueError("no record looks like CounterFact or zsRE (expected e.g. 'requested_rewrite' or 'src')")
    return votes.most_common(1)[0][0]


def _check(case: Case) -> Case:
    """Raise ``ValueError`` unless ``case`` is a valid edit with something to measure."""
    case.request()  # validates subject, relation template and target
    if case.target_new.lower() == case.target_true.lower():
        raise ValueError("target_new equals the true object")
    if case.kind == COUNTERFACT and not case.neighbourhood:
        raise ValueError("no neighbourhood prompts")
    if case.kind == ZSRE and not case.neighbourhood:
        raise ValueError("no locality question")
    return case


def parse_records(records: Sequence[object]) -> tuple[list[Case], Skipped]:
    """Cases from decoded JSON records, any of the three forms; bad records are skipped and reported."""
    cases: list[Case] = []
    skipped = Skipped()
    if not records:
        return cases, skipped
    fmt = detect_format(records)
    log.info("reading %d %s records", len(records), fmt)
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError("record is not an object")
            cases.append(_check(_READERS[fmt](record, index)))
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # any malformed record is skipped
            skipped.add(index, str(err))
    if skipped.count:
        log.warning("skipped %d of %d records: %s", skipped.count, len(records), skipped.by_reason())
    return cases, skipped


def load_cases(path: str | Path) -> tuple[list[Case], Skipped]:
    """Read a JSON list (or JSON-lines file) of CounterFact or zsRE records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {err}") from err
    if isinstance(data, dict):
        data = data.get("data", data.get("records"))
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a list of records")
    return parse_records(data)


def sample_cases(cases: Sequence[Case], n: int | None, seed: int) -> list[Case]:
    """A seeded random sample of ``n`` cases (all of them, shuffled, when ``n`` is ``None`` or too big)."""
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    k = len(cases) if n is None else min(n, len(cases))
    return random.Random(seed).sample(list(cases), k)
