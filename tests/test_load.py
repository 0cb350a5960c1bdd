"""Load, short and bounded: 8 ``gradio_client`` chat clients and a stream of edits and reverts on a tiny model.

The app is served in this process on loopback (``build_ui`` + ``launch``), so the test can compare the
live weights with a rebuild from the ledger. The figures come from ``bench/load.py``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bench.load import LoadPlan, landed_once, run_load
from chat_app.ui import CONCURRENCY, build_ui
from tests.reliability_helpers import digest, fast_service, one_thread
from tests.ui_server import free_port

PLAN = LoadPlan(clients=8, chats_per_client=2, max_new_tokens=16, edits=4, revert_every=2, steps=3, seconds=150)


def test_chats_edits_and_reverts_under_load_end_consistent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    db = tmp_path / "ledger.db"
    with one_thread():
        service = fast_service(db)
        demo = build_ui(service)
        demo.queue(default_concurrency_limit=CONCURRENCY)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            report = run_load(f"http://127.0.0.1:{port}/", PLAN)
        finally:
            demo.close()
        for line in report.lines():
            logging.getLogger(__name__).warning("%s", line)  # shown with -rA; the figures belong to bench/load.py

        assert report.errors == []
        assert len(report.chat_waits) == PLAN.clients * PLAN.chats_per_client  # every chat completed
        assert len(report.edits) == PLAN.edits and len(report.reverted) == PLAN.edits // PLAN.revert_every
        assert report.overlapping("edit", "chat") > 0  # the edits did run beside the chats
        assert landed_once(str(db), report) == []  # each edit once, under the id the app reported
        assert service.ledger.integrity_check() == [] and service.integrity_problems() == []
        assert not service.ledger.pending()
        rebuilt = fast_service(db)  # a fresh process's view: base weights + the ledger replayed
        assert digest(rebuilt.model) == digest(service.model)
        assert [r.id for r in rebuilt.ledger.applied()] == [r.id for r in service.ledger.applied()]
