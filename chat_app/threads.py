"""Intra-op threads for chat generation: the cores are shared among the generations running at once.

torch runs each operation on all cores by default, per calling thread. With several chats
generating at once (one thread each), 4 chats × 2 threads would contend for 2 cores and spin
in each other's way. Each generation takes ``cores // running`` threads (at least 1) when it
starts; torch's setting is per thread, so edits and traces in other threads keep all cores.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_running = [0]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def generation_threads(cores: int | None = None) -> Iterator[int]:
    """Run the block (in the generating thread) with this generation's share of the cores; yields that share."""
    cores = cores or available_cores()
    with _lock:
        _running[0] += 1
        share = max(1, cores // _running[0])
    before = torch.get_num_threads()
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(before)
        with _lock:
            _running[0] -= 1
