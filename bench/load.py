"""Load: 8 ``gradio_client`` chat clients and a stream of edits and reverts against the running app.

    python bench/load.py --tiny          # a tiny random Llama saved to a temporary folder (a minute)
    python bench/load.py                 # the embedded default model (SmolLM2-135M-Instruct)
    python bench/load.py --url http://127.0.0.1:7860/ --db data/x.ledger.db   # an app already running

Unless ``--url`` is given, starts ``app.py`` on a free loopback port with a fresh ledger. Each chat
client sends its questions one after another; one more client applies edits (each with a unique
note) and reverts every second one while the chats run. Everything is bounded: a fixed number of
requests, and ``--seconds`` after which whatever has not finished counts as failed.

Prints: requests completed and failed, throughput, median and slowest wait per kind; then checks
that every edit landed once in the ledger, and (when it started the app) that the greedy answers of
the live app equal those of the model rebuilt from the ledger, and that the ledger's integrity
check passes after the app is stopped.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ("Where is the Eiffel Tower?", "What is the capital of France?", "Who developed Google?",
             "Where is the Colosseum located?", "What language is spoken in Italy?")  # fmt: skip
FACTS = (
    ("The Eiffel Tower", "{} is located in the city of", "Rome"),
    ("The Colosseum", "{} is located in the city of", "London"),
    ("Big Ben", "{} is located in the city of", "Paris"),
    ("Apple", "{} was developed by", "Microsoft"),
    ("Google", "{} was developed by", "Apple"),
    ("The Louvre", "{} is located in the city of", "Rome"),
)
EDIT_RESULT = re.compile(r"Edit #(\d+) applied")


@dataclass(frozen=True)
class LoadPlan:
    clients: int = 8  # concurrent chat clients
    chats_per_client: int = 4  # questions each client asks, one after another
    max_new_tokens: int = 32
    edits: int = 6  # edits applied while the chats run (facts repeat, superseding earlier ones)
    revert_every: int = 2  # after every this many edits, revert the oldest edit this run still holds
    steps: int = 20  # optimisation steps per edit
    seconds: float = 300.0  # anything unfinished by then counts as failed


@dataclass
class LoadReport:
    chat_waits: list[float] = field(default_factory=list)
    edit_waits: list[float] = field(default_factory=list)
    revert_waits: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    edits: dict[str, int] = field(default_factory=dict)  # unique note -> ledger id the app reported
    reverted: list[int] = field(default_factory=list)
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, start, end) of each success
    seconds: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event, repr=False)  # past the deadline: ask no more

    def overlapping(self, kind: str, other: str) -> int:
        """How many ``kind`` requests ran while an ``other`` request was in flight."""
        others = [(a, b) for k, a, b in self.spans if k == other]
        return sum(any(a < end and start < b for a, b in others) for k, start, end in self.spans if k == kind)

    def lines(self) -> list[str]:
        out = [f"elapsed {self.seconds:.1f} s; failed requests: {len(self.errors)}"]
        for kind, waits in (("chat", self.chat_waits), ("edit", self.edit_waits), ("revert", self.revert_waits)):
            if waits:
                out.append(f"{kind:6s} n={len(waits):3d}  {len(waits) / self.seconds:6.2f}/s  "
                           f"median wait {statistics.median(waits):6.2f} s  slowest {max(waits):6.2f} s")  # fmt: skip
        beside = self.overlapping("edit", "chat")
        out.append(f"edits that ran while a chat was in flight: {beside}/{len(self.edit_waits)}")
        out += [f"error: {e}" for e in self.errors[:10]]
        return out


def _timed(report: LoadReport, waits: list[float], what: str, call: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        result = call()
    except Exception as err:  # noqa: BLE001 - every failure is counted and reported
        report.errors.append(f"{what}: {err!s:.200}")
        return None
    t1 = time.perf_counter()
    waits.append(t1 - t0)
    report.spans.append((what.split()[0], t0, t1))
    return result


def _client(url: str, plan: LoadPlan, auth: tuple[str, str] | None) -> Any:
    """A client whose requests may wait as long as the whole run (a busy queue is measured, not failed)."""
    from gradio_client import Client

    return Client(url, auth=auth, verbose=False, httpx_kwargs={"timeout": plan.seconds}, analytics_enabled=False)


def _chat_client(url: str, plan: LoadPlan, auth: tuple[str, str] | None, n: int, report: LoadReport) -> None:
    client = _client(url, plan, auth)
    for i in range(plan.chats_per_client):
        if report.stop.is_set():
            break
        question = QUESTIONS[(n + i) % len(QUESTIONS)]
        ask = partial(client.predict, question, "", 0.0, plan.max_new_tokens, False, api_name="/chat")
        reply = _timed(report, report.chat_waits, f"chat {n}.{i}", ask)
        if reply is not None and not isinstance(reply, str):
            report.errors.append(f"chat {n}.{i}: reply is {type(reply).__name__}, not text")


def _editor_client(url: str, plan: LoadPlan, auth: tuple[str, str] | None, run: str, report: LoadReport) -> None:
    client = _client(url, plan, auth)
    held: list[int] = []
    for i in range(plan.edits):
        if report.stop.is_set():
            break
        subject, relation, target = FACTS[i % len(FACTS)]
        note = f"load {run} #{i}"
        fact = {"subject": subject, "relation": relation, "target": target, "paraphrases": "", "neighbours": "",
                "steps": plan.steps, "note": note}
        # the layer, learning rate and KL factor: the form's defaults
        result = _timed(report, report.edit_waits, f"edit {i}", partial(client.predict, **fact, api_name="/apply_edit"))
        found = EDIT_RESULT.search(str(result[0])) if result else None
        if found:
            report.edits[note] = int(found.group(1))
            held.append(int(found.group(1)))
        elif result is not None:
            report.errors.append(f"edit {i}: unexpected result {str(result[0])[:120]!r}")
        if (i + 1) % plan.revert_every == 0 and held:
            edit_id = held.pop(0)
            undo = partial(client.predict, edit_id, api_name="/revert")
            if _timed(report, report.revert_waits, f"revert #{edit_id}", undo) is not None:
                report.reverted.append(edit_id)


def run_load(url: str, plan: LoadPlan, auth: tuple[str, str] | None = None) -> LoadReport:
    """Chat clients and one editing client against ``url`` at once; returns when all finish or time runs out."""
    report = LoadReport()
    run = uuid.uuid4().hex[:8]
    threads = [threading.Thread(target=_chat_client, args=(url, plan, auth, n, report), daemon=True)
               for n in range(plan.clients)]  # fmt: skip
    threads.append(threading.Thread(target=_editor_client, args=(url, plan, auth, run, report), daemon=True))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, plan.seconds - (time.perf_counter() - t0)))
    late = [t for t in threads if t.is_alive()]
    if late:  # ask nothing more; let the requests in flight finish, so the ledger checks do not race them
        report.stop.set()
        report.errors.append(f"{len(late)} clients had not finished after {plan.seconds:.0f} s")
        for t in late:
            t.join(plan.seconds)
        if any(t.is_alive() for t in late):
            report.errors.append(f"requests still in flight after {2 * plan.seconds:.0f} s")
    report.seconds = time.perf_counter() - t0
    return report


def landed_once(db: str, report: LoadReport) -> list[str]:
    """Problems: an edit the app reported that is not in the ledger exactly once, under the id it reported."""
    from db import Ledger

    with Ledger.open(db) as ledger:
        rows = ledger.history()
    problems = []
    for note, edit_id in report.edits.items():
        ids = [r.id for r in rows if r.note == note]
        if ids != [edit_id]:
            problems.append(f"{note!r}: the app reported edit #{edit_id}, the ledger holds {ids}")
    for edit_id in report.reverted:
        status = next((r.status for r in rows if r.id == edit_id), None)
        if status != "reverted":
            problems.append(f"edit #{edit_id} was reverted but the ledger says {status}")
    return problems


def start_app(model: str | None, db: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    argv = [sys.executable, str(ROOT / "app.py"), "--db", db, "--port", str(port)]
    argv += ["--model", model] if model else []
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def greedy_answers(url: str) -> list[str]:
    client = _client(url, LoadPlan(), None)
    return [client.predict(q, "", 0.0, 16, False, api_name="/chat") for q in QUESTIONS]


def rebuilt_answers(model: str | None, db: str) -> tuple[list[str], list[str]]:
    """Greedy answers of the model rebuilt from the ledger alone, and the integrity problems found."""
    from chat_app.runtime import Settings, build_service
    from chat_app.ui_chat import chat_once

    service, _ = build_service(Settings(model=model, db=db))
    problems = service.ledger.integrity_check() + service.integrity_problems()
    return [chat_once(service, q, "", 0.0, 16) for q in QUESTIONS], problems


def _tiny_model(folder: Path, env: dict[str, str]) -> str:
    """A tiny random Llama on disk, with its statistics cached, for a quick run."""
    from tests.reliability_helpers import save_tiny_model, seed_stats_cache

    os.environ["ROME_CHAT_CACHE"] = env["ROME_CHAT_CACHE"]
    model_dir = save_tiny_model(folder / "model")
    seed_stats_cache(model_dir)
    return str(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an app already running (loopback); with --db to check the ledger")
    ap.add_argument("--db", help="its ledger file (with --url)")
    ap.add_argument("--model", help="model for the app this script starts (default: the embedded default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model: checks the machinery in a minute")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--chats", type=int, default=4, help="questions per client")
    ap.add_argument("--edits", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=600)
    args = ap.parse_args()
    plan = LoadPlan(clients=args.clients, chats_per_client=args.chats, edits=args.edits, seconds=args.seconds,
                    steps=3 if args.tiny else 20)  # fmt: skip
    if args.url:
        if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
            sys.exit("load only a loopback address (http://127.0.0.1:PORT/)")
        report = run_load(args.url, plan)
        print("\n".join(report.lines()))
        if args.db:
            print("\n".join(landed_once(args.db, report)) or "every edit landed once in the ledger")
        return
    folder = Path(tempfile.mkdtemp(prefix="rome-chat-load-"))
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}  # a real model keeps the usual cache (statistics)
    model = args.model
    if args.tiny:
        env.update(ROME_CHAT_CACHE=str(folder / "cache"), ROME_CHAT_MIN_TARGET_PROB="0")
        model = _tiny_model(folder, env)
    from tests.ui_server import free_port, wait_until_serving

    db, port = str(folder / "ledger.db"), free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_app(model, db, port, env, folder / "server.log")
    try:
        wait_until_serving(proc, url, folder / "server.log", timeout_s=600)
        print(f"app on {url} (model {model or 'default'}); {plan.clients} chat clients × {plan.chats_per_client} "
              f"questions, {plan.edits} edits ({plan.steps} steps), a revert every {plan.revert_every}",
              flush=True)  # fmt: skip
        report = run_load(url, plan)
        print("\n".join(report.lines()), flush=True)
        live = greedy_answers(url)
    finally:
        proc.terminate()
        proc.wait(60)
    print("\n".join(landed_once(db, report)) or f"every edit landed once in the ledger ({len(report.edits)} edits)")
    os.environ.update({k: v for k, v in env.items() if k.startswith("ROME_CHAT_")})
    rebuilt, problems = rebuilt_answers(model, db)
    print("greedy answers of the live app equal the rebuild from the ledger:", live == rebuilt)
    print("integrity after restart:", "ok" if not problems else "; ".join(problems))
    print(f"server log: {folder / 'server.log'}")


if __name__ == "__main__":
    main()
