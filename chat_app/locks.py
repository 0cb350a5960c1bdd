"""A readers-writer lock: chats and edit computations read the weights together; a weight change waits for them and runs alone."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Writer-preferring, except behind a long reader.

    Once a writer waits, new readers queue behind it, so edits cannot starve. But while a long
    reader (a causal trace: up to minutes) holds the lock, the writer cannot get in anyway, so
    new readers (chats of a few seconds) are still let in: an edit queued during a trace does
    not block every chat until the trace ends. When the long readers are gone, the writer goes
    next, after the short readers already inside.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._long_readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self, long: bool = False) -> Iterator[None]:
        """Hold the weights for reading; ``long=True`` for readers that hold them for many seconds."""
        with self._cond:
            while self._writer or (self._waiting_writers and not self._long_readers):
                self._cond.wait()
            self._readers += 1
            self._long_readers += long
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._long_readers -= long
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
