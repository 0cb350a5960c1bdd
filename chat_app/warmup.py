"""Key statistics prepared in the background, so the first correction never computes them.

``StatsWarmup(editor).start()`` runs ``editor.cov(layer)`` for the default layer in a daemon
thread right after start-up: from the disk cache or the statistics shipped with the app
(``editing.shipped_stats``: the default model's default layer) in well under a second, or computed
over the corpus (a minute or more on a small CPU) for another model on a fresh machine. Chats are unaffected: the
statistics read the unedited weights through ``editor.original_weights()``, which swaps
nothing globally. An edit submitted meanwhile calls ``wait``, which relays the preparation's
progress to the edit's own progress callback until the statistics are ready.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from chat_app.service import EditService
from editing import RomeEditor

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]
POLL_S = 0.25  # how often a waiting edit re-reads the preparation's progress


@dataclass(frozen=True)
class WarmupState:
    layer: int
    fraction: float  # 0..1 of the statistics computed
    ready: bool
    error: str | None = None
    seconds: float | None = None  # how long the preparation took, once finished

    @property
    def finished(self) -> bool:
        return self.ready or self.error is not None


class StatsWarmup:
    """Prepare ``editor.cov(layer)`` once, in a background thread; thread-safe to read and wait on."""

    def __init__(self, editor: RomeEditor, layer: int | None = None) -> None:
        self.editor = editor
        self.layer = editor.hparams.layer if layer is None else layer
        self._fraction = 0.0
        self._error: str | None = None
        self._seconds: float | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StatsWarmup:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stats-warmup", daemon=True)
            self._thread.start()
        return self

    def _progress(self, _stage: str, fraction: float) -> None:
        self._fraction = max(self._fraction, min(max(fraction, 0.0), 1.0))

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.editor.cov(self.layer, progress=self._progress)
            self._fraction = 1.0
        except Exception as err:  # noqa: BLE001 - reported in the banner; the edit then computes them itself
            log.exception("background statistics for layer %d failed", self.layer)
            self._error = f"{type(err).__name__}: {err}"
        finally:
            self._seconds = time.perf_counter() - t0
            self._done.set()
        if self._error is None:
            log.info("key statistics for layer %d ready (%.1f s)", self.layer, self._seconds)

    @property
    def state(self) -> WarmupState:
        done = self._done.is_set()
        return WarmupState(self.layer, self._fraction, done and self._error is None, self._error,
                           self._seconds if done else None)  # fmt: skip

    def wait(self, progress: Progress | None = None, timeout_s: float | None = None) -> WarmupState:
        """Block until the preparation has finished (or ``timeout_s``), relaying its progress as ``"statistics"``.

        Returns the state; a failed preparation is not raised here: the edit computes the statistics itself.
        """
        if self._thread is None:
            return self.state
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._done.wait(POLL_S):
            if progress is not None:
                progress("statistics", self._fraction)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return self.state

    def banner(self) -> str:
        """One line for the app's banner: preparing (with progress), ready, or failed."""
        state = self.state
        if state.error is not None:
            return "key statistics could not be prepared in the background; the first edit computes them"
        if state.ready:
            return "edits are ready"
        return (f"preparing key statistics for layer {state.layer} ({100 * state.fraction:.0f} %); "
                "chat now, edits wait for them")  # fmt: skip


def start_warmup(service: EditService) -> StatsWarmup | None:
    """Start preparing the default layer's statistics unless the app is read-only or ``ROME_CHAT_WARMUP=0``."""
    if service.read_only or os.environ.get("ROME_CHAT_WARMUP", "1") == "0":
        return None
    return StatsWarmup(service.editor).start()
