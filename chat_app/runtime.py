"""Settings → model → editor → ledger → service, as ``app.py`` and the tests build them."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from chat_app.service import EditService
from chat_app.startup import StartupReport, replay
from db import Ledger, resolve_url
from editing import RomeEditor, load_model
from editing.loading import default_model_path

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # None: the embedded default model
    db: str | None = None  # SQLAlchemy URL or file path; else $DATABASE_URL; else a file under data/
    device: str | None = None
    read_only: bool = False
    actor: str = "app"
    data_dir: Path = PROJECT_ROOT / "data"


def default_ledger_path(settings: Settings) -> Path:
    """One ledger file per model, so pointing the app at another model never trips over the old ledger."""
    source = Path(settings.model) if settings.model else default_model_path()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem or str(source))[:80]
    return Path(os.environ.get("ROME_CHAT_DATA", settings.data_dir)) / f"{name}.ledger.db"


def build_service(settings: Settings) -> tuple[EditService, StartupReport]:
    """Load the model, open the ledger, replay it; log progress for the terminal."""
    log.info("loading model %s", settings.model or "SmolLM2-135M-Instruct (embedded)")
    model, tok = load_model(settings.model, device=settings.device)
    editor = RomeEditor(model, tok)
    url = resolve_url(settings.db, default_ledger_path(settings))
    ledger = Ledger.open(url)
    service = EditService(editor, ledger, actor=settings.actor, read_only=settings.read_only)
    count = len(ledger.applied())
    log.info("replaying %d applied edits from %s", count, ledger.where)
    report = replay(service)
    log.info("ready: %d edits active (%.2f s replay)", report.replayed, report.seconds)
    return service, report
