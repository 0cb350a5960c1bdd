"""Event handlers of the History tab and the page (the form's are in ``ui_form``): plain functions of the service.

Handlers call only the public service API. A user's mistake (``ValueError``, a read-only
refusal) becomes ``gr.Error`` with the service's message, raised before anything changes.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from chat_app import ui_render as render
from chat_app.ui_form import FormHandlers, signed_in, user_errors, whole
from chat_app.ui_inputs import refuse
from chat_app.service import EditService
from chat_app.settings import export_root
from chat_app.warmup import StatsWarmup

try:  # written alongside the UI; the History tab hides Export/Import until it exists
    from chat_app.transfer import export_file, import_file
except ImportError:  # pragma: no cover - depends on the checkout
    export_file = import_file = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

COMMON_RELATIONS = [
    "{} is located in the city of",
    "The capital of {} is",
    "{} was born in",
    "{} works for",
    "The native language of {} is",
    "{} plays the sport of",
    "{} is a citizen of",
    "{} was developed by",
]
STATUS_CHOICES = ["all", "applied", "reverted", "superseded", "refused", "failed", "pending"]
EXPORT_KEEP_S = 600.0  # an export file older than this is deleted (Gradio serves its own copy of it)


class Handlers(FormHandlers):
    """The form and History tabs' handlers, bound to one service shared by every browser session."""

    def __init__(self, service: EditService, warmup: StatsWarmup | None = None) -> None:
        self.service, self.warmup = service, warmup
        self._exports: Path | None = None  # one folder for this app's export files, removed at exit
        self._awaiting = {}  # per session: the applied edit whose remaining checks run (``FormHandlers.finish_checks``)

    def close(self) -> None:
        """Remove the export folder and what it holds."""
        if self._exports is not None:
            shutil.rmtree(self._exports, ignore_errors=True)
            self._exports = None

    def _export_path(self, name: str) -> Path:
        """Where the next export file goes: one folder for the app, pruned of files older than ``EXPORT_KEEP_S``."""
        if self._exports is None:
            self._exports = Path(tempfile.mkdtemp(prefix="rome-chat-exports-"))
            atexit.register(self.close)
        now = time.time()
        for old in self._exports.iterdir():
            if now - old.stat().st_mtime > EXPORT_KEEP_S:
                old.unlink(missing_ok=True)
        path, n = self._exports / name, 1
        while path.exists():  # two exports in the same second
            n += 1
            path = self._exports / f"{Path(name).stem}-{n}{Path(name).suffix}"
        return path

    # ----- shared -------------------------------------------------------------------
    def banner(self) -> str:
        n = self.service.active_count
        text = f"**{n} edit{'s' if n != 1 else ''} active** on the model"
        text += " · the original model is one switch away in the Chat tab" if n else " · the model is unedited"
        weak = [r.id for r in self.service.history(status="applied") if r.not_holding]
        if weak:
            text += (f" · ⚠ **{len(weak)} applied, not holding** ("
                     + ", ".join(f"#{i}" for i in weak) + "): their own prompts do not give the new object")  # fmt: skip
        if self.service.read_only:
            text += " · **read-only**: editing is disabled"
        elif self.warmup is not None:
            text += f" · {self.warmup.banner()}"
        if self.service.synced_at is not None:
            synced = datetime.fromtimestamp(self.service.synced_at, timezone.utc).strftime("%H:%M:%S")
            text += f" · weights synced with the ledger at {synced} UTC"
        return text

    def statistics_ready(self) -> None:
        """Weight changes wait for the background statistics, which must see the weights they started on."""
        if self.warmup is not None:
            self.warmup.wait()

    def chat_label(self) -> str:
        """The Chat tab's title for the model it talks to: edited (how many edits) or not."""
        n = self.service.active_count
        return f"Edited model ({n} edit{'s' if n != 1 else ''})" if n else "Model (no edits)"

    def refresh(self, text: str | None = None, status: str | None = None, batch: str | None = None) -> tuple[str, pd.DataFrame]:
        """Banner and history table, after any change."""
        return self.banner(), self.history(text, status, batch)

    def refresh_page(self, text: str | None = None, status: str | None = None,
                     batch: str | None = None) -> tuple[str, pd.DataFrame, Any]:  # fmt: skip
        """Banner, history table and the Chat tab's title, after any change."""
        return (*self.refresh(text, status, batch), gr.Chatbot(label=self.chat_label()))

    def signature(self) -> tuple[int, int, str, float | None]:
        """Changes whenever any session or instance changes the ledger, or the background statistics progress."""
        return (self.service.active_count, len(self.service.events()), self.warmup.banner() if self.warmup else "",
                self.service.synced_at)  # fmt: skip

    # ----- history ----------------------------------------------------------------------
    def history(self, text: str | None = None, status: str | None = None, batch: str | None = None) -> pd.DataFrame:
        chosen = None if status in (None, "", "all") else status
        with user_errors():
            records = self.service.history(status=chosen, text=(text or "").strip() or None, batch=batch)
            return render.history_frame(records)

    def detail(self, edit_id: Any) -> str:
        if edit_id is None or edit_id == "":
            return "Select a row of the table to see an edit's detail and audit trail."
        chosen = whole(edit_id, "edit id")
        with user_errors():
            return render.record_detail(self.service.record(chosen), self.service.events(chosen))

    def select(self, evt: gr.SelectData) -> tuple[int | None, str]:
        """A click on a history row: its id and detail."""
        row = evt.row_value or []
        if not row or row[0] in (None, ""):
            return None, self.detail(None)
        edit_id = int(row[0])
        return edit_id, self.detail(edit_id)

    def revert(self, edit_id: Any, request: gr.Request | None = None) -> tuple[str, str]:
        chosen = whole(edit_id, "edit id")
        with user_errors():
            record = self.service.revert(chosen, actor=signed_in(request))
        text = f"Reverted edit #{record.id}: the model no longer holds {render.code(record.target)}."
        return text, self.detail(chosen)

    def reapply(self, edit_id: Any, request: gr.Request | None = None) -> tuple[str, str]:
        chosen = whole(edit_id, "edit id")
        self.statistics_ready()
        with user_errors():
            record = self.service.reapply(chosen, actor=signed_in(request))
        return f"Re-applied edit #{record.id}.", self.detail(chosen)

    def verify(self) -> tuple[str, pd.DataFrame]:
        with user_errors():
            items = self.service.verify()
        broken = [i.edit_id for i in items if not i.holds]
        if not items:
            return "No applied edits to verify.", render.verify_frame(items)
        text = f"{len(items) - len(broken)}/{len(items)} applied edits still hold."
        if broken:
            text += " Not holding: " + ", ".join(f"#{i}" for i in broken) + "."
        return text, render.verify_frame(items)

    def export(self) -> tuple[str | None, str]:
        """Write the applied edits to a file offered for download."""
        if export_file is None:
            raise refuse("export is not available in this version")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = self._export_path(f"rome-chat-edits-{stamp}.zip")
        with user_errors():
            count = export_file(self.service, path)
        return str(path), f"Exported {count} applied edit{'s' if count != 1 else ''}."

    def import_(self, path: str | None, request: gr.Request | None = None) -> str:
        if import_file is None:
            raise refuse("import is not available in this version")
        if not path:
            raise refuse("choose an export file to import first")
        self.statistics_ready()
        with user_errors():
            report = import_file(self.service, path, actor=signed_in(request))
        text = f"Imported {len(report.imported)} edit{'s' if len(report.imported) != 1 else ''}"
        if report.imported:
            text += " (" + ", ".join(f"#{i}" for i in report.imported) + ")"
        return text + f"; skipped {report.skipped} already present."

    def export_model(self, fmt: str, ids_text: str | None) -> str:
        """Write the edited model (hf, peft or gguf) to a new folder on the server; say where."""
        if self.service.read_only:
            raise gr.Error("this app runs read-only: exporting the model to the server's disk is disabled")
        ids = None
        if ids_text and ids_text.strip():
            ids = [whole(part, "edit id") for part in ids_text.replace(",", " ").split()]
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        with user_errors():
            done = self.service.export_model(export_root() / f"model-{fmt}-{stamp}", fmt, ids)
        held = ", ".join(f"#{i}" for i in done.edit_ids) or "none (the base model)"
        return (f"Wrote the **{done.format}** export to `{done.path}` on the server ({', '.join(done.files)}). "
                f"Edits it holds: {held}. Its README.md lists them and says how to load it.")  # fmt: skip
