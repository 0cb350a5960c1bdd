"""The command line over the service: ``python app.py [global flags] COMMAND …``.

Readable tables by default, JSON with ``--json``; any error exits non-zero with one clear line.
``history`` and ``export`` open the ledger alone (``LedgerReader``): no torch import, no model load.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url

from chat_app.fact_file import read_facts
from chat_app.reader import LedgerReader
from chat_app.settings import Settings, ledger_url
from db import Ledger
from db.durability import file_problems
from db.engine import sqlite_file
from editing.defaults import EXPORT_FORMATS, LAYERED, STRENGTHENED

if TYPE_CHECKING:
    from chat_app.service import EditService

log = logging.getLogger(__name__)
READ_COMMANDS = ("history", "export")  # served by the ledger alone
DAMAGE_ADVICE = ("The ledger is damaged: restore it from a backup (app.py backup writes one). An edit whose "
                 "factors are damaged can be left out instead: app.py --skip-edit ID … marks it failed and "
                 "replays the others, which app.py --skip-edit ID export FILE then exports.")  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    edit = sub.add_parser("edit", help="apply a new fact (or the facts of --file)")
    edit.add_argument("--subject")
    edit.add_argument("--relation", help='template with {} for the subject, e.g. "{} is located in"')
    edit.add_argument("--target")
    edit.add_argument("--file", help="facts from a .json, .jsonl or .csv file (subject/relation/target or "
                      "EasyEdit's prompt/subject/target_new); refused whole if any row is bad")
    edit.add_argument("--dry-run", action="store_true", help="with --file: check and list the facts, apply nothing")
    edit.add_argument("--batch", action="store_true",
                      help="with --file: apply the facts as one MEMIT batch (all recorded, or none) instead of one by one")
    edit.add_argument("--layer", type=int)
    edit.add_argument("--paraphrase", action="append", default=[], help="a prompt to check (repeatable)")
    edit.add_argument("--neighbour", action="append", default=[], help="a prompt that must not change (repeatable)")
    edit.add_argument("--note")
    edit.add_argument("--force", action="store_true",
                      help="apply even if the update norm is an outlier, or the edit's own prompt does not hold after it")
    edit.add_argument("--strengthen", action="store_true",
                      help="for an edit that does not show in the answer: "
                      + ", ".join(f"{k}={v}" for k, v in STRENGTHENED.items()))  # fmt: skip
    edit.add_argument("--update", choices=("r-rome", "alphaedit", *LAYERED),
                      help="the update rule (default: the model's, r-ROME); memit and alphaedit-layers spread the fact "
                      "over 5 layers as a batch of one, solved with the keys of the edits already applied (MEMIT's or "
                      "AlphaEdit's solve): they keep far more of the neighbourhood over long sequences of corrections "
                      "(README, Many corrections)")  # fmt: skip
    edit.add_argument("--json", action="store_true")
    history = sub.add_parser("history", help="list the ledger")
    history.add_argument("--status")
    history.add_argument("--batch", help="only the facts of this batch")
    history.add_argument("--json", action="store_true")
    for name in ("revert", "reapply"):
        cmd = sub.add_parser(name, help=f"{name} an edit by id, or every fact of a batch with --batch ID")
        cmd.add_argument("id", type=int, nargs="?")
        cmd.add_argument("--batch", help="the batch id (history's batch column)")
        cmd.add_argument("--json", action="store_true")
    verify = sub.add_parser("verify", help="re-check applied edits (and with --integrity the ledger)")
    verify.add_argument("--integrity", action="store_true")
    verify.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="write edits to one file")
    export.add_argument("path")
    export.add_argument("--ids", type=int, nargs="+")
    backup = sub.add_parser("backup", help="write the whole ledger to one consistent SQLite file (safe while running)")
    backup.add_argument("path")
    imp = sub.add_parser("import", help="apply the edits of an export file")
    imp.add_argument("path")
    imp.add_argument("--json", action="store_true")
    model = sub.add_parser("export-model", help="write the edited model: hf checkpoint, peft LoRA adapter or GGUF")
    model.add_argument("dir", help="a new (or empty) folder to write into")
    model.add_argument("--format", choices=EXPORT_FORMATS, default="hf",
                       help="hf: merged checkpoint (default); peft: the edits as a LoRA adapter; gguf: a GGUF file")  # fmt: skip
    model.add_argument("--ids", type=int, nargs="*",
                       help="applied edits to include (default: all; --ids alone: none, the base model)")  # fmt: skip
    model.add_argument("--json", action="store_true")


def _row(r: Any) -> dict[str, Any]:
    return {"id": r.id, "status": r.status, "subject": r.subject, "relation": r.relation, "target": r.target,
            "layer": r.layer, "layers": r.layers, "answer_before": r.answer_before, "answer_after": r.answer_after,
            "created_at": r.created_at.isoformat(), "superseded_by": r.superseded_by, "author": r.author,
            "holding": None if r.status != "applied" else not r.not_holding, "batch_id": r.batch_id,
            "batch_index": r.batch_index, "batch_size": r.batch_size}  # fmt: skip


def _shown_status(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "status": "applied, not holding"} if row["holding"] is False else row


def _printable(text: str) -> str:
    """Control characters (C0, DEL, C1) as escapes: text from the ledger or an import never drives the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_printable(str(r.get(c, "") if r.get(c) is not None else "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if getattr(args, "json", False) else text)


def _progress(stage: str, frac: float) -> None:
    log.info("%s %3.0f%%", stage, 100 * frac)


def run_read_command(args: argparse.Namespace, reader: LedgerReader) -> int:
    """``history`` and ``export``: the ledger alone."""
    if args.command == "history":
        records = reader.history(status=args.status, batch=getattr(args, "batch", None))
        rows = [_row(r) for r in records]
        shown = [{**_shown_status(row), "layer": r.layer_label} for row, r in zip(rows, records)]
        columns = ["id", "status", "subject", "relation", "target", "layer", "answer_before", "author"]
        if any(r["batch_id"] for r in rows):
            columns.append("batch_id")
        _emit(args, rows, _table(shown, columns))
    else:
        count = reader.export_edits(args.path, args.ids)
        print(f"exported {count} edits to {args.path}")
    return 0


def run_command(args: argparse.Namespace, service: EditService) -> int:
    from chat_app.transfer import import_file
    from editing import EditRequest

    cmd = args.command
    if cmd in READ_COMMANDS:
        return run_read_command(args, LedgerReader(service.ledger))
    if cmd == "edit" and args.file:
        return _edit_file(args, service)
    if cmd == "edit":
        if args.batch:
            raise ValueError("--batch applies the facts of --file as one batch; give --file")
        if not (args.subject and args.relation and args.target):
            raise ValueError("edit needs --subject, --relation and --target, or --file")
        request = EditRequest(args.subject, args.relation, args.target, args.layer)
        if args.update in LAYERED:
            return _edit_layered(args, service, request, LAYERED[args.update])
        result = service.apply(request, paraphrases=args.paraphrase, neighbours=args.neighbour, note=args.note,
                               allow_outlier=args.force, force=args.force, progress=_progress,
                               **(STRENGTHENED if args.strengthen else {}),
                               **({"update": args.update} if args.update else {}))  # fmt: skip
        held = "" if not result.record.not_holding else " (applied, not holding: its own prompt does not give the target)"
        _emit_applied(args, result.record, result.superseded, result.stats, result.probes, held)
    elif cmd in ("revert", "reapply") and args.batch:
        if args.id is not None:
            raise ValueError(f"{cmd} takes an edit id or --batch ID, not both")
        records = (service.revert_batch if cmd == "revert" else service.reapply_batch)(args.batch)
        rows = [_row(r) for r in records]
        _emit(args, rows, f"batch {args.batch}:\n{_table(rows, ['id', 'batch_index', 'status', 'subject', 'target'])}")
    elif cmd in ("revert", "reapply"):
        if args.id is None:
            raise ValueError(f"{cmd} needs an edit id, or --batch ID")
        record = (service.revert if cmd == "revert" else service.reapply)(args.id)
        _emit(args, _row(record), f"edit #{record.id} is now {record.status}")
    elif cmd == "verify":
        items = service.verify()
        data: dict[str, Any] = {"edits": [{"id": i.edit_id, "subject": i.subject, "target": i.target,
                                           "holds": i.holds, "probes": list(i.probes)} for i in items]}  # fmt: skip
        text = _table(data["edits"], ["id", "subject", "target", "holds"])
        ok = all(i.holds for i in items)
        if args.integrity:
            problems = service.ledger.integrity_check() + service.integrity_problems()
            data["integrity_problems"] = problems
            text += "\nintegrity: " + ("ok" if not problems else "; ".join(problems))
            ok = ok and not problems
        _emit(args, data, text)
        return 0 if ok else 1
    elif cmd == "export-model":
        done = service.export_model(args.dir, args.format, args.ids)
        data = {"path": str(done.path), "format": done.format, "edit_ids": list(done.edit_ids), "files": list(done.files)}
        _emit(args, data, f"exported {done.format} with {len(done.edit_ids)} edits to {done.path}")
    elif cmd == "import":
        report = import_file(service, args.path)
        data = {"imported": list(report.imported), "skipped": report.skipped, "ignored": report.ignored}
        _emit(args, data, f"imported {len(report.imported)} edits, skipped {report.skipped} duplicates")
    return 0


def _without_model(args: argparse.Namespace, settings: Settings) -> int | None:
    """Commands about the ledger file itself, which need no model: ``backup``, and a damaged file's ``verify``."""
    if args.command == "backup":
        with Ledger.open(ledger_url(settings)) as ledger:
            target = ledger.backup(args.path)
        print(f"backed up the ledger {ledger.where} to {target}")
        return 0
    if args.command == "verify" and args.integrity:
        url = ledger_url(settings)
        path = sqlite_file(make_url(url))
        problems = file_problems(path) if path is not None and path.exists() else []
        if not problems:  # the stored data, before a replay that damaged factors would stop
            with Ledger.open(url) as ledger:
                problems = ledger.integrity_check()
        if problems:
            _emit(args, {"edits": [], "integrity_problems": problems, "advice": DAMAGE_ADVICE},
                  "integrity: " + "; ".join(problems) + "\n" + DAMAGE_ADVICE)  # fmt: skip
            return 1
    return None


def _edit_layered(args: argparse.Namespace, service: EditService, request: Any, solve: str) -> int:
    """``edit --update memit|alphaedit-layers``: the fact as a batch of one (recorded, reverted and replayed like any batch fact)."""
    if args.strengthen:
        raise ValueError(f"--strengthen belongs to the single-layer update; --update {args.update} spreads the fact over layers")
    extra = {"update": solve} if solve != "memit" else {}  # compute_batch: MEMIT's solve unless "alphaedit"
    result = service.apply_batch([request], checks=[(args.paraphrase, args.neighbour)], note=args.note,
                                 allow_outlier=args.force, progress=_progress, **extra)  # fmt: skip
    where = f" at layers {result.stats.get('layers')} (batch {result.batch_id})"
    _emit_applied(args, result.records[0], result.superseded, result.stats, result.probes[0], where)
    return 0


def _emit_applied(args: argparse.Namespace, record: Any, superseded: Sequence[int], stats: dict[str, Any],
                  probes: Sequence[Any], detail: str) -> None:  # fmt: skip
    """One applied edit: its row, what it superseded, its stats and probes (``--json``), or a line and the probe table."""
    data = {**_row(record), "superseded": list(superseded), "stats": stats, "probes": [p.to_dict() for p in probes]}
    text = _table([p.to_dict() for p in probes], ["kind", "prompt", "before", "after", "holds"])
    sup = f"; superseded {list(superseded)}" if superseded else ""
    _emit(args, data, f"applied edit #{record.id}{detail}{sup}\n{text}")


def _edit_file(args: argparse.Namespace, service: EditService) -> int:
    """``edit --file``: every row checked before any is applied; a per-fact result table."""
    if args.subject or args.relation or args.target:
        raise ValueError("use either --file or --subject/--relation/--target, not both")
    from chat_app.fact_batch import apply_facts, apply_facts_batch

    facts = read_facts(args.file)
    if args.batch:
        outcomes = apply_facts_batch(service, facts, dry_run=args.dry_run, note=args.note, progress=_progress)
    else:
        done = lambda i, n: log.info("fact %d of %d", i, n)  # noqa: E731
        outcomes = apply_facts(service, facts, dry_run=args.dry_run, note=args.note, on_fact=done)
    rows = [o.to_dict() for o in outcomes]
    applied = sum(o.status.startswith("applied") for o in outcomes)
    batch_id = outcomes[0].batch_id if outcomes else None
    head = (f"{len(facts)} facts checked, nothing applied (dry run)" if args.dry_run
            else f"applied {applied} of {len(facts)} facts" + (f" as batch {batch_id}" if batch_id else ""))  # fmt: skip
    columns = ["line", "subject", "relation", "target", "status", "edit_id", "detail"]
    columns += ["before", "after"] if batch_id else []
    _emit(args, {"facts": rows, "applied": applied, "dry_run": args.dry_run, "batch_id": batch_id},
          f"{head}\n{_table(rows, columns)}")
    return 0 if args.dry_run or applied == len(facts) else 1


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if getattr(args, "file", None):
            read_facts(args.file)  # a refused file is reported before the model loads
        code = _without_model(args, settings)
        if code is not None:
            return code
        if args.command in READ_COMMANDS and not settings.skip_edits:  # --skip-edit quarantines at start-up
            return run_read_command(args, LedgerReader.open(settings))
        from chat_app.runtime import build_service, closing_on_stop

        service, _ = build_service(settings)
        with closing_on_stop(service, settings):
            return run_command(args, service)
    except (ValueError, PermissionError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
