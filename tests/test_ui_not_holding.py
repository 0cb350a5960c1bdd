"""An applied edit whose own prompt does not give the target is shown as "applied, not holding" (History, detail,
banner, CLI); "Apply anyway" sends ``force=True``; export files live in one folder that is pruned and removed."""
from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chat_app import ui_handlers, ui_render
from chat_app.service import EditService
from chat_app.ui_handlers import Handlers
from editing import EditRequest
from tests.reliability_helpers import fast_service, one_thread

A = EditRequest("The Eiffel tower", "Located in {}", "rome")
B = EditRequest("Big Ben", "{} is in", "paris")
FORM = (A.subject, A.relation, A.target, "", "", 2, 3, 0.5, 0.0625, "")  # the form's ten fields


@pytest.fixture
def service(tmp_path: Path) -> Iterator[EditService]:
    with one_thread():
        service = fast_service(tmp_path / "ledger.db")
        yield service
    service.ledger.close()


def set_edited_probe(path: Path, edit_id: int, holds: bool) -> None:
    """Set whether the stored 'edited' probe of an edit held (a tiny random model decides it by chance)."""
    with sqlite3.connect(path) as conn:
        (text,) = conn.execute("SELECT probes_json FROM edits WHERE id = ?", (edit_id,)).fetchone()
        after = "rome" if holds else "New York"
        probes = [{**p, "holds": holds, "after": after} if p["kind"] == "edited" else p for p in json.loads(text)]
        conn.execute("UPDATE edits SET probes_json = ? WHERE id = ?", (json.dumps(probes), edit_id))


def test_history_detail_and_banner_show_an_edit_that_does_not_hold(service: EditService, tmp_path: Path) -> None:
    with one_thread():
        first, second = service.apply(A).edit_id, service.apply(B).edit_id
    set_edited_probe(tmp_path / "ledger.db", first, holds=False)
    set_edited_probe(tmp_path / "ledger.db", second, holds=True)
    frame = ui_render.history_frame(service.history()).set_index("id")
    assert frame.loc[first, "status"] == "⚠ applied, not holding" and frame.loc[second, "status"] == "✓ applied"
    assert "applied, not holding" in ui_render.record_detail(service.record(first), service.events(first))
    banner = Handlers(service).banner()
    assert "2 edits active" in banner and "1 applied, not holding" in banner and f"#{first}" in banner
    service.revert(first)
    assert ui_render.history_frame(service.history()).set_index("id").loc[first, "status"] == "↺ reverted"
    assert "not holding" not in Handlers(service).banner()


def test_apply_anyway_passes_force_to_the_service(service: EditService, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real = service.apply

    def spy(request: EditRequest, **kwargs: Any) -> Any:
        seen.append(kwargs.get("force"))
        return real(request, **kwargs)

    monkeypatch.setattr(service, "apply", spy)
    handlers = Handlers(service)
    with one_thread():
        handlers.apply(*FORM, progress=lambda *a, **k: None)
        text, _ = handlers.apply_anyway(*FORM, progress=lambda *a, **k: None)
    assert seen == [False, True] and "Edit #2 applied" in text


def test_exports_go_to_one_folder_that_is_pruned_and_removed(service: EditService, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with one_thread():
        service.apply(A)
    handlers = Handlers(service)
    files = [Path(handlers.export()[0]) for _ in range(3)]
    assert all(f.is_file() for f in files) and len(set(files)) == 3
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # one folder, not one per export
    monkeypatch.setattr(ui_handlers, "EXPORT_KEEP_S", -1.0)  # every earlier file is now old
    latest = Path(handlers.export()[0])
    assert sorted(latest.parent.iterdir()) == [latest]
    handlers.close()
    assert list((tmp_path / "tmp").iterdir()) == []
