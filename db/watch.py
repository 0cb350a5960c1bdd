"""Noticing that the ledger changed: LISTEN/NOTIFY on PostgreSQL, a revision poll elsewhere.

Every write transaction bumps ``meta.revision`` (database triggers, migration 0002); on
PostgreSQL the same trigger sends ``NOTIFY rome_chat_ledger``, delivered at commit. A
``LedgerWatch`` waits for either and returns the revision now stored; the caller compares it
with the one it last acted on. Notifications only wake the watcher early: the revision is
always read back, so a missed notification (a reconnect) costs at most one timeout.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from db.queries import LedgerReads
from db.schema import LedgerError

log = logging.getLogger(__name__)
CHANNEL = "rome_chat_ledger"
POLL_S = 0.1  # SQLite: one indexed read of a one-row key per poll


class LedgerWatch:
    """Wait for changes to one ledger. Not thread-safe: one watcher thread uses it."""

    def __init__(self, ledger: LedgerReads, poll_s: float = POLL_S) -> None:
        self.ledger, self.poll_s = ledger, poll_s
        url = ledger.url
        self._listen = url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg"
        self._conn: Any = None

    @property
    def mode(self) -> str:
        return "listen" if self._listen else "poll"

    def wait(self, last: int | None, timeout_s: float) -> int | None:
        """The ledger's revision once it differs from ``last``, or after ``timeout_s``; None if unreadable."""
        deadline = time.monotonic() + timeout_s
        if self._listen and self._conn is None:  # listen first, then read: no commit falls in between
            self._wait_notify(0)
        while True:
            revision = self._revision()
            left = deadline - time.monotonic()
            if revision != last or left <= 0:
                return revision
            if self._listen:
                self._wait_notify(left)
            else:
                time.sleep(min(self.poll_s, left))

    def _revision(self) -> int | None:
        try:
            return self.ledger.revision()
        except (SQLAlchemyError, LedgerError, ValueError) as err:
            log.warning("cannot read the ledger's revision: %s", err)
            return None

    def _wait_notify(self, timeout_s: float) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._connect()
            if timeout_s <= 0:
                return
            for _ in self._conn.notifies(timeout=timeout_s, stop_after=1):
                break
        except Exception as err:  # noqa: BLE001 - any driver failure: fall back to a pause, reconnect later
            log.warning("LISTEN on the ledger failed (%s); retrying", err)
            self.close()
            time.sleep(min(timeout_s, 1.0))

    def _connect(self) -> None:
        import psycopg  # only for PostgreSQL ledgers

        conninfo = self.ledger.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._conn = psycopg.connect(conninfo, autocommit=True)
        self._conn.execute(f"LISTEN {CHANNEL}")

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
