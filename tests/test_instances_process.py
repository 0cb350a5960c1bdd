"""Instances as separate processes: one follows another's edit, and a SIGKILL mid-edit harms neither.

This process serves as instance B (a service with its follower). Instance A runs in child
processes (``tests/fault_worker.py``, forked from one parent that imported everything once):
the first is SIGKILLed inside the commit of its edit, the second after committing another edit.
B must keep its weights through the first and follow the second; a restart of the
killed instance (``build_service``) comes up with B's weights.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chat_app.follow import Follower
from chat_app.runtime import Settings, build_service
from tests.pg_server import wait_until
from tests.reliability_helpers import ROOT, app_env, digest, in_process_app, one_thread, tiny_app_on_disk, wait_for_json

WORKER_TIMEOUT_S = 300
FOLLOW_S = 30.0  # a bound for a busy CI machine; the 2 s target is measured by bench/instances.py
EDITS = {"inside": ("The Eiffel tower", "Located in {}", "rome"), "after": ("The Colosseum", "Located in {}", "paris")}


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_app_on_disk(tmp_path_factory.mktemp("instances"), {})


def test_another_process_is_followed_and_its_sigkill_leaves_all_consistent(
    ledger_url: str, disk: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    with in_process_app(disk["cache"]), one_thread():
        b, _ = build_service(Settings(model=str(disk["model"]), db=ledger_url))
    base = digest(b.model)
    spec = []
    for name, fact in EDITS.items():  # the "inside the commit" child holds the writer lock first
        (tmp_path / name).mkdir()
        spec.append({"argv": [str(disk["model"]), ledger_url, str(tmp_path / name), "edit", *fact],
                     "pause_at": f"{'commit' if name == 'inside' else 'after'}:mark_applied"})  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    follower = Follower(b).start()
    with open(tmp_path / "workers.log", "wb") as log:
        parent = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_worker.py"), "--each",
                                   str(tmp_path / "spec.json")], env=app_env(disk["cache"]), stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        try:
            inside = wait_for_json(tmp_path / "inside" / "paused.json", parent, WORKER_TIMEOUT_S)
            os.kill(inside["pid"], signal.SIGKILL)  # mid-edit: its weights changed, its commit never happened
            after = wait_for_json(tmp_path / "after" / "paused.json", parent, WORKER_TIMEOUT_S)
            followed = wait_until(lambda: b.active_count == 1, FOLLOW_S)
            os.kill(after["pid"], signal.SIGKILL)
            parent.wait(WORKER_TIMEOUT_S)
        finally:
            follower.stop()
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    assert followed is not None, "B did not follow the other process's committed edit"
    assert digest(b.model) == after["weights"] != base  # B holds exactly the committed edit, not the killed one
    assert [r.subject for r in b.ledger.applied()] == ["The Colosseum"] and b.ledger.integrity_check() == []
    with in_process_app(disk["cache"]), one_thread():
        restarted, startup = build_service(Settings(model=str(disk["model"]), db=ledger_url))
    assert digest(restarted.model) == digest(b.model) and startup.repaired  # the killed edit: pending → failed
    assert b.sync() is False and not b.ledger.pending()
