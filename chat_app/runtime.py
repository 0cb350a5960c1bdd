"""Settings → model → editor → ledger → service, as ``app.py`` and the tests build them."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chat_app.service import EditService
from chat_app.settings import Settings, default_ledger_path, ledger_url, model_source
from chat_app.startup import StartupReport, replay
from db import Ledger, LedgerError
from db.durability import header_problems
from editing import RomeEditor, load_model

log = logging.getLogger(__name__)
__all__ = ["Settings", "build_service", "closing_on_stop", "default_ledger_path", "ledger_url"]
SEEN_FILE = ".ledgers-seen.json"  # in the data folder: the highest edit id each ledger held when last used


def build_service(settings: Settings) -> tuple[EditService, StartupReport]:
    """Load the model, open the ledger, replay it; log progress for the terminal."""
    log.info("loading model %s", settings.model or "SmolLM2-135M-Instruct (embedded)")
    model, tok = load_model(settings.model, device=settings.device, device_map=settings.device_map)
    editor = RomeEditor(model, tok)
    ledger = Ledger.open(ledger_url(settings))
    for problem in header_problems(ledger.file) if ledger.file is not None else ():
        log.error("%s: SQLite can only read this ledger, so new edits cannot be recorded. Restore it from a backup "
                  "(run app.py verify --integrity for details)", problem)  # fmt: skip
    try:
        check_not_emptied(ledger, settings)
    except LedgerError:
        ledger.close()
        raise
    service = EditService(editor, ledger, actor=settings.actor, read_only=settings.read_only,
                          source=model_source(settings))  # fmt: skip
    count = len(ledger.applied())
    log.info("replaying %d applied edits from %s", count, ledger.where)
    report = replay(service, skip=settings.skip_edits)
    log.info("ready: %d edits active (%.2f s replay)", report.replayed, report.seconds)
    return service, report


def _seen(ledger: Ledger, settings: Settings) -> tuple[Path, dict[str, int]] | None:
    """The data folder's record of ledgers, when ``ledger`` is this model's default data-folder ledger."""
    default = default_ledger_path(settings).absolute()
    if ledger.file is None or ledger.file.absolute() != default:
        return None
    path = default.parent / SEEN_FILE
    try:
        seen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seen = {}
    return path, (seen if isinstance(seen, dict) else {})


def check_not_emptied(ledger: Ledger, settings: Settings) -> None:
    """Refuse a data-folder ledger that holds fewer edits than when this app last used it; remember what it holds."""
    found = _seen(ledger, settings)
    if found is None:
        return
    path, seen = found
    now, before = ledger.highest_id(), seen.get(ledger.file.name, 0)
    if isinstance(before, int) and now < before:
        holds = "no edits" if now == 0 else f"edits only up to #{now}"
        raise LedgerError(
            f"the ledger {ledger.where} held edits up to #{before} when this app last used it, but now holds {holds}: "
            "it was emptied or replaced, or lost its -wal file. Nothing was changed. Restore it from a backup; "
            f"or, to go on with it as it is, remove its entry {ledger.file.name!r} from {path}."
        )
    remember(ledger, settings)


def remember(ledger: Ledger, settings: Settings) -> None:
    """Record the highest edit id of the data-folder ledger (checked at the next start-up)."""
    found = _seen(ledger, settings)
    if found is None:
        return
    path, seen = found
    seen[ledger.file.name] = ledger.highest_id()
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen, indent=1), encoding="utf-8")
        os.chmod(tmp, 0o600)
        tmp.replace(path)
    except OSError as err:
        log.warning("could not record the ledger's size in %s: %s", path, err)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@contextmanager
def closing_on_stop(service: EditService, settings: Settings | None = None) -> Iterator[None]:
    """Close the ledger however the block ends: normal return, Ctrl-C (SIGINT), SIGTERM or an error.

    SIGTERM is made to act as Ctrl-C, which Gradio's server answers by shutting down; closing the
    ledger checkpoints it, so every edit is in the one database file when the process ends.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        log.info("interrupted; stopping")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if settings is not None:
            remember(service.ledger, settings)
        service.ledger.close()
        log.info("ledger %s checkpointed and closed", service.ledger.where)
