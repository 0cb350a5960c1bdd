"""Corrections from a file: ``.json`` (a list of objects), ``.jsonl`` (one object a line) or ``.csv`` (a header row).

Each record is a fact in our fields, ``subject`` / ``relation`` (with ``{}`` for the subject) / ``target``,
or in the field names EasyEdit and FastEdit files use: ``prompt`` (with the subject written in it,
or with ``{}``), ``subject`` and ``target_new`` (or ``target``; CounterFact's ``{"str": …}`` too).
Optional: ``layer``, ``paraphrases`` / ``rephrase_prompt`` and ``neighbours`` / ``locality_prompt``
(prompts the service checks after the edit). The file is all or nothing: any bad record refuses it,
with every problem reported by line.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editing import EditRequest

MAX_FILE_BYTES = 2_000_000
MAX_FACTS = 500
FORMATS = (".json", ".jsonl", ".csv")


@dataclass(frozen=True)
class FileFact:
    line: int  # where the record starts in the file (1-based)
    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()


class FactFileError(ValueError):
    """The file is refused; ``problems`` lists ``(line, reason)`` (line 0: the whole file)."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        lines = "; ".join(f"line {n}: {why}" if n else why for n, why in problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path.name} refused, nothing applied ({len(problems)} problem(s)): {lines}{more}")


def _text(value: Any) -> str:
    if isinstance(value, dict) and "str" in value:  # CounterFact's {"str": "Rome", "id": …}
        value = value["str"]
    if isinstance(value, list) and len(value) == 1:  # EasyEdit lists of one
        value = value[0]
    return "" if value is None else str(value).strip()


def _prompts(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [] if value in (None, "") else [value]
    return tuple(t for t in (_text(v) for v in items) if t)


def to_fact(line: int, record: Any) -> FileFact:
    """One record as a fact; raises ``ValueError`` saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with fields, got {type(record).__name__}")
    subject = _text(record.get("subject"))
    target = _text(record.get("target", record.get("target_new")))
    if "relation" in record:
        relation = _text(record["relation"])
        if "{}" not in relation:
            raise ValueError(f"relation {relation!r:.60} has no {{}} where the subject goes")
    elif "prompt" in record:
        prompt = _text(record["prompt"])
        if "{}" in prompt:
            relation = prompt
        elif subject and subject in prompt:
            relation = prompt.replace(subject, "{}", 1)
        else:
            raise ValueError(f"the subject {subject!r:.40} is not in the prompt {prompt!r:.60}")
    else:
        raise ValueError("needs subject, relation and target (or prompt, subject and target_new)")
    if not target:
        raise ValueError("the target is empty")
    layer = record.get("layer")
    if layer in ("", None):
        layer = None
    elif isinstance(layer, str) and layer.strip().isdigit():
        layer = int(layer)
    request = EditRequest(subject, relation, target, layer)  # its own checks raise ValueError
    paraphrases = _prompts(record.get("paraphrases", record.get("rephrase_prompt")))
    neighbours = _prompts(record.get("neighbours", record.get("locality_prompt")))
    return FileFact(line, request, paraphrases, neighbours)


def _json_records(text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON list with the line each starts on."""
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        record, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, record
        pos = end


def _records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:  # one bad line; the others are still checked
                    yield n, ValueError(f"unreadable JSONL: {err.msg} at column {err.colno}")
    elif path.suffix == ".json":
        if not text.lstrip().startswith("["):
            raise ValueError("a .json file must hold a list of facts ([{...}, ...])")
        yield from _json_records(text)
    else:
        reader = csv.DictReader(io.StringIO(text))
        start = 2
        for row in reader:
            yield start, {k.strip(): v for k, v in row.items() if k is not None}
            start = reader.line_num + 1


def read_facts(path: Path | str, max_facts: int = MAX_FACTS) -> list[FileFact]:
    """Every fact of the file, or ``FactFileError`` listing each bad record by line (then nothing is applied)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path.name}: use a {', '.join(FORMATS)} file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise FactFileError(path, [(0, f"the file is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}")])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise FactFileError(path, [(0, f"the file is not UTF-8 text ({err.reason})")]) from err
    facts, problems, seen = [], [], {}
    try:
        for line, record in _records(path, text):
            try:
                if isinstance(record, ValueError):
                    raise record
                fact = to_fact(line, record)
            except ValueError as err:
                problems.append((line, str(err)))
                continue
            key = (fact.request.subject.casefold(), fact.request.relation.casefold())
            if key in seen:
                problems.append((line, f"the same subject and relation as line {seen[key]} ({fact.request.prompt!r:.60})"))
            seen.setdefault(key, line)
            facts.append(fact)
    except (json.JSONDecodeError, csv.Error) as err:
        problems.append((getattr(err, "lineno", 0), f"unreadable {path.suffix[1:].upper()}: {err}"))
    except ValueError as err:
        problems.append((0, str(err)))
    if len(facts) > max_facts:
        problems.append((0, f"the file holds {len(facts)} facts; the limit is {max_facts}"))
    if not facts and not problems:
        problems.append((0, "the file holds no facts"))
    if problems:
        raise FactFileError(path, problems)
    return facts
