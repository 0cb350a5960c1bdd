"""A background thread that keeps one instance's weights equal to the shared ledger.

It waits for the ledger's revision to change (``db.watch``: LISTEN/NOTIFY on PostgreSQL, a
0.1 s poll of one row on SQLite) and then calls ``service.sync()``. A sync waits for an edit
in progress in this instance and for running chats, so a change made elsewhere shows here
within the wait plus the sync (typically well under the 2 s target), unless this instance is
itself computing an edit; then it follows right after. Read-only instances follow too.
"""
from __future__ import annotations

import logging
import threading

from chat_app.sync import LedgerSync
from db.watch import LedgerWatch

log = logging.getLogger(__name__)
WAIT_S = 1.0  # longest wait between revision reads (PostgreSQL: a missed notification costs this much)


class Follower:
    """``start()`` once after start-up's replay; ``stop()`` on shutdown (the thread is a daemon anyway)."""

    def __init__(self, service: LedgerSync, wait_s: float = WAIT_S, poll_s: float | None = None) -> None:
        self.service, self.wait_s = service, wait_s
        self.watch = LedgerWatch(service.ledger) if poll_s is None else LedgerWatch(service.ledger, poll_s)
        self.syncs = 0  # how many syncs changed the weights (for tests and the bench)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-follower", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        log.info("following the ledger %s (%s)", self.service.ledger.where, self.watch.mode)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.wait_s + 5)
        self.watch.close()

    def _run(self) -> None:
        last: int | None = None
        while not self._stop.is_set():
            revision = self.watch.wait(last, self.wait_s)
            if revision is None:
                self._stop.wait(self.wait_s)
                continue
            if revision == last:
                continue
            try:
                if self.service.sync():
                    self.syncs += 1
                last = revision
            except Exception:  # noqa: BLE001 - keep following; the next change retries
                log.exception("could not sync the weights with the ledger; retrying")
                self._stop.wait(self.wait_s)
