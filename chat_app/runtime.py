"""Settings → model → editor → ledger → service, as ``app.py`` and the tests build them."""
from __future__ import annotations

import logging

from chat_app.service import EditService
from chat_app.settings import Settings, default_ledger_path, model_source
from chat_app.startup import StartupReport, replay
from db import Ledger, resolve_url
from editing import RomeEditor, load_model

log = logging.getLogger(__name__)
__all__ = ["Settings", "build_service", "default_ledger_path"]


def build_service(settings: Settings) -> tuple[EditService, StartupReport]:
    """Load the model, open the ledger, replay it; log progress for the terminal."""
    log.info("loading model %s", settings.model or "SmolLM2-135M-Instruct (embedded)")
    model, tok = load_model(settings.model, device=settings.device)
    editor = RomeEditor(model, tok)
    url = resolve_url(settings.db, default_ledger_path(settings))
    ledger = Ledger.open(url)
    service = EditService(editor, ledger, actor=settings.actor, read_only=settings.read_only,
                          source=model_source(settings))  # fmt: skip
    count = len(ledger.applied())
    log.info("replaying %d applied edits from %s", count, ledger.where)
    report = replay(service)
    log.info("ready: %d edits active (%.2f s replay)", report.replayed, report.seconds)
    return service, report
