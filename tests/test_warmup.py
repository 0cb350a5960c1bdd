"""Background key statistics: chat works while they are prepared; an edit waits for them, with progress, then lands."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from chat_app.ui_handlers import Handlers
from chat_app.warmup import StatsWarmup
from tests.service_helpers import start
from tests.tiny import tiny_editor, tiny_llama, tiny_tokenizer

RELATION = "{} is located in the city of"


def gated(editor, gate: threading.Event):  # type: ignore[no-untyped-def]
    """Make ``editor.cov`` report half-way, then block until ``gate`` is set (a slow statistics computation)."""
    real = editor.cov

    def cov(layer, n_samples=None, progress=None):  # type: ignore[no-untyped-def]
        if progress is not None:
            progress("statistics", 0.5)
        if not gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return real(layer, n_samples, progress)

    editor.cov = cov
    return real


def test_chat_runs_and_an_edit_waits_for_the_statistics_then_lands(tmp_path: Path) -> None:
    service = start(tmp_path / "l.db")
    gate = threading.Event()
    gated(service.editor, gate)
    warmup = StatsWarmup(service.editor).start()
    handlers = Handlers(service, warmup)
    deadline = time.monotonic() + 10
    while warmup.state.fraction < 0.5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not warmup.state.ready and warmup.state.fraction == 0.5
    assert "preparing key statistics for layer 2 (50 %)" in handlers.banner()

    reply = list(service.chat([{"role": "user", "content": "where is the tower"}], max_new_tokens=4))
    assert reply, "chat must answer while the statistics are prepared"

    shown: list[tuple[float, str]] = []
    done: list[object] = []
    edit = threading.Thread(target=lambda: done.append(handlers.apply(
        "The Eiffel Tower", RELATION, "rome", "", "", None, *_defaults(service),
        progress=lambda f, desc="": shown.append((f, desc)))))  # fmt: skip
    edit.start()
    time.sleep(0.6)
    assert edit.is_alive() and not done, "the edit must wait for the statistics"
    assert service.history() == [], "nothing is recorded while waiting"
    assert any("Waiting for the key statistics" in desc for _, desc in shown), shown
    gate.set()
    edit.join(60)
    assert not edit.is_alive()
    assert warmup.state.ready and warmup.state.seconds is not None
    assert "edits are ready" in handlers.banner()
    assert [r.status for r in service.history()] == ["applied"]
    assert "applied" in done[0][0]
    fractions = [f for f, _ in shown]
    assert fractions == sorted(fractions), "the progress bar never goes back"


def test_a_failed_preparation_is_reported_and_the_edit_computes_the_statistics_itself(tmp_path: Path) -> None:
    service = start(tmp_path / "l.db")
    real = service.editor.cov
    calls = []

    def broken(layer, n_samples=None, progress=None):  # type: ignore[no-untyped-def]
        calls.append(layer)
        if len(calls) == 1:
            raise OSError("disk full")
        return real(layer, n_samples, progress)

    service.editor.cov = broken
    warmup = StatsWarmup(service.editor).start()
    state = warmup.wait(timeout_s=10)
    assert state.finished and not state.ready and "disk full" in (state.error or "")
    handlers = Handlers(service, warmup)
    assert "could not be prepared" in handlers.banner()
    text, _ = handlers.apply("The Eiffel Tower", RELATION, "rome", "", "", None, *_defaults(service),
                             progress=lambda *a, **k: None)  # fmt: skip
    assert "applied" in text and len(calls) > 1  # the edit asked for the statistics again


def test_wait_without_a_started_preparation_returns_at_once() -> None:
    tok = tiny_tokenizer()
    warmup = StatsWarmup(tiny_editor(tiny_llama(), tok))
    t0 = time.monotonic()
    assert not warmup.wait().finished
    assert time.monotonic() - t0 < 1


def _defaults(service):  # type: ignore[no-untyped-def]
    hp = service.editor.hparams
    return hp.steps, hp.lr, hp.kl_factor


pytestmark = pytest.mark.usefixtures("one_thread")
