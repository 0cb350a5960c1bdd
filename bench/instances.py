"""Several instances on one ledger: how fast they follow each other, and whether they stay equal.

    python bench/instances.py                  # SQLite file in a temp dir, tiny model
    python bench/instances.py --pg             # a throwaway PostgreSQL (Debian's postgresql package)
    python bench/instances.py --db postgresql+psycopg://user:pw@host/ledger
    python bench/instances.py --real --edits 3 --ops 0   # the embedded default model (statistics cached)

Two instances, A and B, each with its follower thread (chat_app.follow), and a third service C
standing for the CLI (a fresh process's view; no follower, it catches up before each change),
all in this process on a tiny random Llama (``--real``: the default model, as the app loads it). Prints:

1. follow latency: ``--edits`` edits through A, each timed from A's ``apply`` returning until B's
   weights hold the ledger's applied set; then a revert through C, until A and B both follow;
2. ``--ops`` interleaved edits, supersedes, reverts and re-applies from A, B and C in three
   threads, then: each instance's weights against a clean rebuild from the ledger, the ledger's
   integrity check, and every change a thread was told succeeded found once in the ledger;
3. ``--kills`` rounds of SIGKILL mid-edit, on a tiny model saved to disk and a fresh ledger (a new
   database with ``--pg``, else a new SQLite file): instance A
   runs as separate processes (``tests/fault_worker.py``); one is SIGKILLed inside the commit of its
   edit (its weights already changed), then another commits an edit. Per round: whether B (this
   process, with its follower) kept its weights through the kill, how long after that commit B
   held it (from the committing process's report, written just after its commit), and whether the
   killed instance, restarted (``build_service``, as the app starts), comes up with B's weights.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chat_app.follow import Follower  # noqa: E402
from chat_app.runtime import Settings, build_service  # noqa: E402
from chat_app.service import EditService  # noqa: E402
from editing import EditRequest  # noqa: E402
from tests.pg_server import PgServer, wait_until  # noqa: E402
from tests.reliability_helpers import (  # noqa: E402
    app_env, digest, fast_service, in_process_app, one_thread, tiny_app_on_disk, wait_for_json,
)

SUBJECTS = ("The Eiffel tower", "The Colosseum", "Big Ben", "Apple", "Google", "Microsoft", "Paris", "Rome")
TARGETS = ("rome", "london", "paris", "france", "italy", "england")
RELATIONS = ("Located in {}", "{} is in", "The capital of {} is")


def follow_latency(a: EditService, b: EditService, c: EditService, edits: int) -> tuple[list[float], list[float], float]:
    """Per edit: seconds from A's apply returning until B follows, and A's whole apply; then the CLI revert's."""
    waits, applies = [], []
    for i in range(edits):
        t0 = time.perf_counter()
        try:
            a.apply(EditRequest(SUBJECTS[i % len(SUBJECTS)], RELATIONS[i % len(RELATIONS)], TARGETS[i % len(TARGETS)]))
        except ValueError as err:  # refused (e.g. the real model did not reach the target): nothing to follow
            print(f"edit {i} refused: {err}")  # noqa: T201
            continue
        applies.append(time.perf_counter() - t0)
        ids = a.ledger.applied_ids()
        t = wait_until(lambda: b._applied_ids() == ids, 10.0, 0.005)  # noqa: SLF001
        waits.append(float("inf") if t is None else t)
    c.revert(c.ledger.applied_ids()[0], actor="cli")
    ids = c.ledger.applied_ids()
    t = wait_until(lambda: a._applied_ids() == ids and b._applied_ids() == ids, 10.0, 0.005)  # noqa: SLF001
    return waits, applies, float("inf") if t is None else t


def worker(service: EditService, name: str, ops: int, seed: int, done: list[tuple[str, str, int]],
           errors: list[str]) -> None:  # fmt: skip
    rng = random.Random(seed)
    for _ in range(ops):
        kind = rng.choice(("edit", "edit", "revert", "reapply"))
        try:
            if kind == "edit":
                request = EditRequest(rng.choice(SUBJECTS), rng.choice(RELATIONS), rng.choice(TARGETS))
                result = service.apply(request, note=f"{name}")
                done.append((name, "edit", result.edit_id))
            elif kind == "revert" and (ids := service.ledger.applied_ids()):
                done.append((name, "revert", service.revert(rng.choice(ids), actor=name).id))
            elif kind == "reapply" and (gone := [r.id for r in service.history(status="reverted")]):
                done.append((name, "reapply", service.reapply(rng.choice(gone), actor=name).id))
        except ValueError as err:  # a race lost to another instance: refused, nothing changed
            errors.append(f"{name} {kind}: {str(err)[:90]}")


def interleaved(a: EditService, b: EditService, c: EditService, ops: int, make: Callable[[], EditService]) -> list[str]:
    done: list[tuple[str, str, int]] = []
    errors: list[str] = []
    per = [ops // 3 + (1 if i < ops % 3 else 0) for i in range(3)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s, n, k, i, done, errors))
               for i, (s, n, k) in enumerate(zip((a, b, c), "ABC", per))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    ids = a.ledger.applied_ids()
    settle = wait_until(lambda: a._applied_ids() == ids and b._applied_ids() == ids, 10.0, 0.005)  # noqa: SLF001
    c.sync()
    clean = make()
    want = digest(clean.model)
    skipped = ops - len(done) - len(errors)
    lines = [f"{ops} operations in {seconds:.1f} s: {len(done)} succeeded, {len(errors)} refused (lost races or "
             f"bad random input), {skipped} reverts/re-applies skipped (nothing to pick)",
             f"A and B settled {settle if settle is None else round(settle, 3)} s after the last operation",
             f"weights equal a clean rebuild: A {digest(a.model) == want}, B {digest(b.model) == want}, "
             f"C {digest(c.model) == want}",
             f"ledger integrity problems: {a.ledger.integrity_check() or 'none'}; pending: {len(a.ledger.pending())}"]
    events = a.ledger.events()
    kinds = {"edit": ("applied",), "revert": ("reverted",), "reapply": ("reapplied",)}
    missing = [(n, k, i) for n, k, i in done
               if not any(e.edit_id == i and e.kind in kinds[k] for e in events)]  # fmt: skip
    edits = [i for _, k, i in done if k == "edit"]
    lines.append(f"successful changes missing from the audit trail: {missing or 'none'}; "
                 f"edit ids reported twice: {len(edits) - len(set(edits))}")
    lines += [f"  refused: {e}" for e in errors[:5]]
    return lines


def kill_round(b: EditService, disk: dict[str, Path], url: str, out: Path, n: int) -> dict[str, object]:
    """One SIGKILL mid-edit of another process (A), then a committed edit by a third; B follows only that one."""
    facts = {"killed": (f"{SUBJECTS[n % len(SUBJECTS)]}", "Located in {}", "rome"),
             "committed": (f"{SUBJECTS[(n + 1) % len(SUBJECTS)]}", "{} is in", TARGETS[n % len(TARGETS)])}  # fmt: skip
    spec = []
    for name, fact in facts.items():  # the child paused inside its commit holds the writer lock first
        (out / name).mkdir(parents=True)
        spec.append({"argv": [str(disk["model"]), url, str(out / name), "edit", *fact],
                     "pause_at": f"{'commit' if name == 'killed' else 'after'}:mark_applied"})  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    before = digest(b.model)
    with open(out / "workers.log", "wb") as log:
        parent = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_worker.py"), "--each", str(out / "spec.json")],
                                  env=app_env(disk["cache"]), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            killed = wait_for_json(out / "killed" / "paused.json", parent, 300)
            os.kill(killed["pid"], signal.SIGKILL)  # its weights hold the edit; its commit never happened
            committed = wait_for_json(out / "committed" / "paused.json", parent, 300)
            kept = killed["weights"] != before and digest(b.model) in (before, committed["weights"])
            t_commit = (out / "committed" / "paused.json").stat().st_mtime
            ids = b.ledger.applied_ids()
            wait_until(lambda: b._applied_ids() == ids, 30.0, 0.005)  # noqa: SLF001
            follow = time.time() - t_commit
            os.kill(committed["pid"], signal.SIGKILL)
            parent.wait(60)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    t0 = time.perf_counter()
    with in_process_app(disk["cache"]), one_thread():
        restarted, startup = build_service(Settings(model=str(disk["model"]), db=url))
    restart_s = time.perf_counter() - t0
    result = {
        "B kept its weights through the kill": kept,
        "B equals the committing process": digest(b.model) == committed["weights"],
        "B followed the commit (s)": round(follow, 3),
        "restart (s)": round(restart_s, 2),
        "restarted equals B": digest(restarted.model) == digest(b.model),
        "killed edit marked failed at restart": len(startup.repaired),
        "ledger integrity problems": len(b.ledger.integrity_check()) + len(b.ledger.pending()),
    }
    restarted.ledger.close()
    return result


def kill_mid_edit(url: str, rounds: int) -> list[str]:
    """``rounds`` of ``kill_round`` on one ledger, with B built once and following throughout."""
    root = Path(tempfile.mkdtemp())
    disk = tiny_app_on_disk(root, {})
    with in_process_app(disk["cache"]), one_thread():
        b, _ = build_service(Settings(model=str(disk["model"]), db=url))
    follower = Follower(b).start()
    try:
        results = [kill_round(b, disk, url, root / f"round{n}", n) for n in range(rounds)]
    finally:
        follower.stop()
    follows = [float(r["B followed the commit (s)"]) for r in results]
    restarts = [float(r["restart (s)"]) for r in results]
    ok = all(r["B kept its weights through the kill"] and r["B equals the committing process"]
             and r["restarted equals B"] and r["killed edit marked failed at restart"] == 1
             and r["ledger integrity problems"] == 0 for r in results)  # fmt: skip
    return [*(json.dumps(r) for r in results),
            f"SIGKILL mid-edit, {rounds} rounds, two processes on {b.ledger.where}: all consistent {ok}; B followed the "
            f"next commit median {statistics.median(follows):.3f} s (max {max(follows):.3f}); the killed instance "
            f"restarted into B's weights in median {statistics.median(restarts):.2f} s"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="ledger URL or file (default: a new SQLite file)")
    parser.add_argument("--pg", action="store_true", help="start a throwaway PostgreSQL for the ledger")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--real", action="store_true", help="the embedded default model instead of a tiny one")
    parser.add_argument("--kills", type=int, default=3, help="rounds of SIGKILL mid-edit (tiny model, fresh ledger)")
    args = parser.parse_args(argv)
    server = PgServer.start() if args.pg else None
    url = server.new_database() if server else args.db or str(Path(tempfile.mkdtemp()) / "ledger.db")
    try:
        make = (lambda: build_service(Settings(db=url))[0]) if args.real else (lambda: fast_service(url))
        with nullcontext() if args.real else one_thread():
            a, b, c = make(), make(), make()
            followers = [Follower(a).start(), Follower(b).start()]
            print(f"ledger: {a.ledger.where} ({followers[0].watch.mode})")  # noqa: T201
            waits, applies, revert_wait = follow_latency(a, b, c, args.edits)
            print(f"edit in A → B follows, after A's apply returned: median {statistics.median(waits):.3f} s, "  # noqa: T201
                  f"max {max(waits):.3f} s over {len(waits)} edits (A's apply took median "
                  f"{statistics.median(applies):.3f} s; B may follow before it returns); "
                  f"CLI revert → A and B follow: {revert_wait:.3f} s (target 2 s)")
            if args.ops:
                for line in interleaved(a, b, c, args.ops, make):
                    print(line)  # noqa: T201
            for follower in followers:
                follower.stop()
        if args.kills:
            kill_url = server.new_database() if server else str(Path(tempfile.mkdtemp()) / "kill.db")
            for line in kill_mid_edit(kill_url, args.kills):
                print(line)  # noqa: T201
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
