"""Turn service values into what the web UI shows: escaped Markdown, tables, short summaries.

Every piece of user or model text that reaches a Markdown surface (``gr.Markdown``, a
``markdown`` table column) goes through ``esc`` first, so a subject such as
``<img src=x onerror=…>`` or ``**bold**`` is shown literally and never interpreted.
"""
from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import timezone
from typing import Any

import pandas as pd

from db import EditRecord, EventRecord

HISTORY_HEADERS = ["id", "time (UTC)", "subject", "relation", "requested", "old → new answer", "layer", "status",
                   "author", "batch"]
HISTORY_TYPES = ["number", "str", "markdown", "markdown", "markdown", "markdown", "str", "str", "markdown", "str"]
HISTORY_WIDTHS = ["44px", "112px", "12%", "14%", "9%", "15%", "64px", "120px", "8%", "150px"]  # fits 1280 px; status unclipped
PROBE_HEADERS = ["check", "prompt", "expected", "before", "after", "holds"]
PROBE_TYPES = ["str", "markdown", "markdown", "markdown", "markdown", "str"]
PROBE_WIDTHS = ["8%", "24%", "10%", "26%", "26%", "6%"]  # long chat replies wrap; "after" and "holds" stay in view
VERIFY_HEADERS = ["id", "fact", "new object", "probes holding", "holds"]
VERIFY_TYPES = ["number", "markdown", "markdown", "str", "str"]
CELL_CHARS = 160  # longer text is cut in table cells (the detail view shows it whole)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$=:])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Where a greedy completion runs on past its answer: ", and it's", "; it", " which …" (a lowercase word next).
_RUN_ON = re.compile(r"(?:[,;:]| -| –| —)\s+(?=[a-z])|\s+(?:and|which|who|where|but|because|with)\s")


def esc(text: object, limit: int | None = None) -> str:
    r"""``text`` as inert Markdown: Markdown punctuation backslash-escaped, then ``& < >`` as HTML entities.

    The order matters: entities are made last so their own ``#`` and ``;`` are not escaped.
    Line breaks become spaces (a table cell or a heading is one line).
    """
    if text is None:
        return ""
    value = _CONTROL.sub(" ", str(text)).replace("\r", " ").replace("\n", " ")
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "…"
    return html.escape(_MD_SPECIAL.sub(r"\\\1", value), quote=False)


def code(text: object) -> str:
    """Inline text in a Markdown line, escaped (not a code span: a backtick in ``text`` would end one)."""
    return f"“{esc(text)}”"


def when(moment: Any) -> str:
    """A ledger time (aware, UTC) as ``YYYY-MM-DD HH:MM:SS`` in UTC."""
    if moment is None:
        return ""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def status_mark(status: str) -> str:
    return {"applied": "✓ applied", "reverted": "↺ reverted", "superseded": "→ superseded",
            "refused": "✗ refused", "failed": "✗ failed", "pending": "… pending"}.get(status, status)  # fmt: skip


NOT_HOLDING = "⚠ applied, not holding"


def record_status(record: EditRecord) -> str:
    """The status as shown: an applied edit whose own prompt did not give the target is "applied, not holding"."""
    return NOT_HOLDING if record.not_holding else status_mark(record.status)
def short_answer(text: str | None) -> str:
    """A completion cut where it runs on past its answer ("Tokyo, and it's a major" → "Tokyo …"); the detail shows it whole."""
    if not text:
        return ""
    cut = _RUN_ON.search(text)
    return text if cut is None or cut.start() == 0 else text[: cut.start()].rstrip() + " …"


def answer_change(record: EditRecord) -> str:
    before = esc(short_answer(record.answer_before) or "—", CELL_CHARS)
    after = short_answer(record.answer_after) if record.answer_after is not None else f"({record.target})"
    return f"{before} → **{esc(after, CELL_CHARS)}**"


def history_frame(records: Sequence[EditRecord]) -> pd.DataFrame:
    rows = [
        [r.id, when(r.created_at), esc(r.subject, CELL_CHARS), esc(r.relation, CELL_CHARS), esc(r.target, CELL_CHARS),
         answer_change(r), r.layer_label, record_status(r), esc(r.author or "", CELL_CHARS), batch_label(r)]
        for r in records
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=HISTORY_HEADERS)


def batch_label(record: EditRecord) -> str:
    """"3f2a9c1b0d4e (2/10)": the batch a fact was edited in and its place there; empty for an edit made alone."""
    if record.batch_id is None:
        return ""
    return f"{record.batch_id} ({(record.batch_index or 0) + 1}/{record.batch_size})"


def probes_frame(probes: Sequence[Any]) -> pd.DataFrame:
    """Before/after table of an edit's checks; ``probes`` are ``Probe`` objects or their dicts."""
    rows = []
    for probe in probes:
        p = probe if isinstance(probe, dict) else probe.to_dict()
        held = p.get("holds")
        rows.append([p.get("kind", ""), esc(p.get("prompt"), CELL_CHARS), esc(p.get("expected"), CELL_CHARS),
                     esc(short_answer(p.get("before")), CELL_CHARS),
                     esc(short_answer(p.get("after", p.get("now"))), CELL_CHARS),
                     "—" if held is None else ("✓" if held else "✗")])  # fmt: skip
    return pd.DataFrame(rows, columns=PROBE_HEADERS)


def fact_line(subject: str, relation: str, target: str) -> str:
    """“The Eiffel Tower is located in the city of” → “Rome”, escaped."""
    return f"{code(relation.replace('{}', subject))} → **{esc(target)}**"


def record_detail(record: EditRecord, events: Sequence[EventRecord]) -> str:
    lines = [
        f"### Edit #{record.id} · {record_status(record)}",
        f"{fact_line(record.subject, record.relation, record.target)}",
        "",
        f"- **subject** {code(record.subject)}; **relation** {code(record.relation)}; **layer** {record.layer_label}",
        f"- **answer before** {code(record.answer_before or '—')}; **after** {code(record.answer_after or '—')}",
        f"- **created** {when(record.created_at)} UTC by {esc(record.author or 'unknown')}",
    ]
    if record.note:
        lines.append(f"- **note** {esc(record.note)}")
    if record.superseded_by is not None:
        lines.append(f"- **superseded by** edit #{record.superseded_by}")
    if record.batch_id is not None:
        layers = record.layers
        solve = "AlphaEdit" if (record.meta.get("hparams") or {}).get("update") == "alphaedit" else "MEMIT"
        lines.append(f"- **batch** {code(record.batch_id)}, fact {(record.batch_index or 0) + 1} of {record.batch_size}"
                     + f" ({solve} at layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))})")  # fmt: skip
    if record.refusal_reason:
        lines.append(f"- **refused / failed because** {esc(record.refusal_reason)}")
    stats = record.meta.get("stats") or {}
    if stats:
        labels = {"steps": "{} steps", "target_prob": "target probability {}", "update_norm": "update norm {}",
                  "stats_s": "statistics {} s", "value_s": "optimisation {} s"}  # fmt: skip
        shown = [label.format(_number(stats[k])) for k, label in labels.items() if k in stats]
        lines.append("- **computation** " + " · ".join(shown))
    if record.probes:
        lines += ["", "**Checks at apply time**", ""]
        lines += [f"- {esc(p.get('kind'))}: {code(p.get('prompt'))} → {code(p.get('after') or '—')} "
                  f"{'✓' if p.get('holds') else '✗'}" for p in record.probes]  # fmt: skip
    if events:
        lines += ["", "**Audit trail**", "", "| time (UTC) | event | by | detail |", "| --- | --- | --- | --- |"]
        lines += [f"| {when(e.at)} | {esc(e.kind)} | {esc(e.actor or '')} | {esc(e.detail or '', 300)} |"
                  for e in events]  # fmt: skip
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else esc(value)


NONE_CHECKED = "no paraphrases or neighbours were checked"


def checks_summary(probes: Sequence[Any], pending: Sequence[Any] = ()) -> str:
    """What the checks at apply time say, by kind: never "1/1 checks hold" when only the edited prompt was asked.

    ``pending``: checks still being answered, named instead of counted.
    """
    parts = []
    for kind, label, verb in (("edited", "edited prompt", "gives the new object"),
                              ("paraphrase", "paraphrases", "give the new object"),
                              ("neighbour", "neighbours", "unchanged")):  # fmt: skip
        chosen = [p for p in probes if p.kind == kind]
        if kind == "edited" and chosen:
            parts.append(f"the edited prompt {'gives the new object ✓' if chosen[0].holds else 'does not give it yet ✗'}")
        elif chosen:
            parts.append(f"{label} {sum(p.holds for p in chosen)}/{len(chosen)} {verb}")
    if len(parts) == 1 and not any(p.kind in ("paraphrase", "neighbour") for p in pending):
        parts.append(NONE_CHECKED)
    if pending:
        kinds = {"paraphrase": "paraphrases", "neighbour": "neighbours", "chat": "the chat reply"}
        parts.append("checking " + ", ".join(dict.fromkeys(kinds.get(p.kind, p.kind) for p in pending)) + "…")
    chat = [p for p in probes if p.kind == "chat" and p.after]
    if chat:
        parts.append(f"the chat reply {'names the new object ✓' if chat[0].holds else 'does not name it yet ✗'}")
    return "; ".join(parts)


def shows_in_answers(probes: Sequence[Any]) -> bool:
    """The edit shows where users look: the edited prompt's greedy answer and the chat reply (when asked)."""
    return all(p.holds for p in probes if p.kind == "edited" or (p.kind == "chat" and p.after))


STRENGTHEN_ADVICE = ("It does not show in every answer yet. **Strengthen** recomputes it so that the prompt as typed "
                     "and the chat question get the whole change, and lets the change grow to twice the usual "
                     "limit; it is recorded as a new edit that supersedes this one (History keeps both).")


def verify_frame(items: Sequence[Any]) -> pd.DataFrame:
    rows = [
        [item.edit_id, esc(item.relation.replace("{}", item.subject), CELL_CHARS), esc(item.target, CELL_CHARS),
         f"{sum(bool(p['holds']) for p in item.probes)}/{len(item.probes)}",
         "✓ holds" if item.holds else "✗ broken"]
        for item in items
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=VERIFY_HEADERS)


def top_tokens(top: Sequence[Any]) -> dict[str, float]:
    """``{label: probability}`` for ``gr.Label``; tokens shown quoted (leading spaces matter), duplicates numbered."""
    out: dict[str, float] = {}
    for t in top:
        label = repr(t.token)
        while label in out:
            label += "′"
        out[label] = float(t.prob)
    return out


def conflict_notice(conflicts: Sequence[EditRecord], target: str | None = None) -> str:
    if not conflicts:
        return ""
    olds = "; ".join(f"#{r.id} → {code(r.target)}" for r in conflicts)
    new = f" with {code(target)}" if target and target.strip() else ""
    return (f"⚠ **This fact was already edited** ({olds}). Applying will supersede "
            f"{'it' if len(conflicts) == 1 else 'them'}{new}; the old edit stays in History "
            "and can be re-applied.")  # fmt: skip
