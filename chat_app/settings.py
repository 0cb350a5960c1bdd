"""The app's settings and where its ledger lives: torch-free, so reading the ledger loads no model."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from db import resolve_url
from editing.defaults import default_model_path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> Path:
    """``data/`` beside ``app.py`` in a checkout; for an installed wheel, the user's data folder (XDG)."""
    if (PROJECT_ROOT / "Makefile").is_file():
        return PROJECT_ROOT / "data"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "rome-chat"


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # None: the embedded default model
    db: str | None = None  # SQLAlchemy URL or file path; else $DATABASE_URL; else a file under data/
    device: str | None = None
    device_map: str | None = None  # "auto" …: accelerate spreads the model over the devices (instead of ``device``)
    read_only: bool = False
    skip_edits: tuple[int, ...] = ()  # applied edits to quarantine at start-up (damaged factors)
    actor: str = "app"
    data_dir: Path = field(default_factory=_default_data_dir)


def data_dir(settings: Settings) -> Path:
    """``$ROME_CHAT_DATA`` or the settings' folder: ledgers and exported models go here by default."""
    return Path(os.environ.get("ROME_CHAT_DATA", settings.data_dir))


def export_root() -> Path:
    """Where the web app writes exported models: ``exports/`` in the data folder."""
    return data_dir(Settings()) / "exports"


def model_source(settings: Settings) -> str:
    """What the model was loaded from, as a user can name it again: a path, a Hugging Face id, a GGUF file."""
    if settings.model is None:
        return str(default_model_path())
    path = Path(settings.model).expanduser()
    return str(path.resolve()) if path.exists() else settings.model


def default_ledger_path(settings: Settings) -> Path:
    """One ledger file per model, so pointing the app at another model never trips over the old ledger."""
    source = Path(settings.model) if settings.model else default_model_path()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem or str(source))[:80]
    return data_dir(settings) / f"{name}.ledger.db"


def ledger_url(settings: Settings) -> str:
    """The ledger's URL: ``--db``, else ``$DATABASE_URL``, else this model's file in the data folder."""
    return resolve_url(settings.db, default_ledger_path(settings))
