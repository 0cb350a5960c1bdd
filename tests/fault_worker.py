"""Run one app operation on a tiny model saved to disk, pausing at a chosen point so a test can SIGKILL it.

    python tests/fault_worker.py MODEL_DIR LEDGER OUT_DIR edit SUBJECT RELATION TARGET
    python tests/fault_worker.py MODEL_DIR LEDGER OUT_DIR revert EDIT_ID
    python tests/fault_worker.py MODEL_DIR LEDGER OUT_DIR import EXPORT_FILE
    python tests/fault_worker.py --each SPEC.json

``--each`` imports once, then forks one child per entry of SPEC (``{"argv": [...], "pause_at": ...}``):
the children are separate processes, killed one by one, without each paying for importing torch.
When a child ends, the parent writes ``OUT_DIR/exit.json`` with its exit status.

``ROME_CHAT_PAUSE_AT`` names the point, ``WHEN:METHOD`` of the ledger: ``before:mark_applied``
(before the call), ``commit:mark_applied`` (inside its transaction, every statement run, just
before COMMIT) or ``after:mark_applied`` (committed, before the service returns). The worker
builds the service as the app does, writes ``OUT_DIR/before.json`` (the weights' digest after
start-up), and at the point writes ``OUT_DIR/paused.json`` (the live weights' digest there),
then sleeps until killed. Exit 3: the operation finished without reaching the point.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event  # noqa: E402

from chat_app.runtime import Settings, build_service  # noqa: E402
from chat_app.service import EditService  # noqa: E402
from chat_app.transfer import import_file  # noqa: E402
from editing import EditRequest  # noqa: E402
from tests.reliability_helpers import digest, write_json  # noqa: E402

PAUSE_S = 600.0
EDIT_STEPS = 2  # optimisation steps: the edit's quality is beside the point here


def install_pause(service: EditService, point: str, out: Path) -> None:
    when, method = point.split(":")
    if when not in ("before", "commit", "after"):
        raise SystemExit(f"unknown pause point {point!r}")
    ledger = service.ledger
    real = getattr(ledger, method)
    inside = threading.Event()

    def pause() -> None:
        write_json(out / "paused.json", {"point": point, "pid": os.getpid(), "weights": digest(service.model)})
        time.sleep(PAUSE_S)
        raise SystemExit("not killed in time")

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            pause()
        inside.set()
        result = real(*args, **kwargs)
        if when == "after":
            pause()
        return result

    def before_commit(_conn: Any) -> None:
        if when == "commit" and inside.is_set():
            pause()

    setattr(ledger, method, wrapper)
    event.listen(ledger._engine, "commit", before_commit)  # noqa: SLF001 - fires before the driver's COMMIT


def main(argv: list[str]) -> int:
    model_dir, db, out, op, *rest = argv
    out_dir = Path(out)
    service, _ = build_service(Settings(model=model_dir, db=db))
    write_json(out_dir / "before.json", {"weights": digest(service.model)})
    install_pause(service, os.environ["ROME_CHAT_PAUSE_AT"], out_dir)
    if op == "edit":
        service.apply(EditRequest(*rest), steps=EDIT_STEPS)
    elif op == "revert":
        service.revert(int(rest[0]))
    elif op == "import":
        import_file(service, rest[0])
    else:
        raise SystemExit(f"unknown operation {op!r}")
    return 3


def each(spec_path: str) -> int:
    """Fork a child per entry; wait for all (the test kills them), recording how each ended."""
    children = {}
    for entry in json.loads(Path(spec_path).read_text()):
        pid = os.fork()
        if pid == 0:
            os.environ["ROME_CHAT_PAUSE_AT"] = entry["pause_at"]
            try:
                code = main(entry["argv"])
            except BaseException:  # noqa: BLE001 - reported, and the child must never return into the loop
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        children[pid] = Path(entry["argv"][2])
    while children:
        pid, status = os.wait()
        write_json(children.pop(pid) / "exit.json", {"status": status})
    return 0


if __name__ == "__main__":
    sys.exit(each(sys.argv[2]) if sys.argv[1] == "--each" else main(sys.argv[1:]))
