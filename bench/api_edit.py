"""In-app edit latency through the app's API (``gradio_client``), with a breakdown of where the time goes.

    nice -n 10 python bench/api_edit.py --n 8
    nice -n 10 python bench/api_edit.py --n 8 --url http://127.0.0.1:7860/   # an app already running: totals only

Serves the app in this process (default model, a fresh ledger in a temporary folder, statistics
prepared before timing), wraps the service's steps with timers, then for each CounterFact
development case does what a user of the form does: ``/preview``, then ``/apply_edit`` with one
paraphrase and one neighbour, timed end to end at the client (the edit applied, its own prompt
checked), then ``/apply_edit_checks``, which returns once the paraphrase, neighbour and chat row are
answered (the browser chains it), timed from the same start; the edit is reverted (untimed)
before the next. Prints per edit the end-to-end time and the seconds spent in: probe completions,
the edit's computation, ledger writes and reads, parameter checksums, and the UI refresh that
follows an apply in the browser (history table and banner), then medians.
"""
from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"
SPANS: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPANS[label] += time.perf_counter() - t0
            COUNTS[label] += 1

    return wrapper


def instrument(service: Any) -> None:
    """Wrap the service's steps (module functions and the ledger's and editor's methods) with timers."""
    import chat_app.service as service_mod
    import editing.editor as editor_mod
    from chat_app import ui_handlers

    import chat_app.completions as completions_mod

    for module, name in ((service_mod, "complete"), (service_mod, "complete_batch"), (service_mod, "answer"),
                         (completions_mod, "complete_batch"), (completions_mod, "answer")):  # fmt: skip
        if hasattr(module, name):  # the outermost generation calls only, so nothing is counted twice
            setattr(module, name, timed("probes", getattr(module, name)))
    editor_mod.tensor_checksum = timed("checksums", editor_mod.tensor_checksum)
    service.editor.compute = timed("compute (incl. its checksums)", service.editor.compute)
    for name in ("record_pending", "mark_applied", "add_event", "set_state_checksums"):
        setattr(service.ledger, name, timed("ledger writes", getattr(service.ledger, name)))
    for name in ("get", "find_applied"):
        setattr(service.ledger, name, timed("ledger reads", getattr(service.ledger, name)))
    ui_handlers.Handlers.refresh = timed("UI refresh (history, banner)", ui_handlers.Handlers.refresh)


def serve(folder: Path) -> str:
    from chat_app.runtime import Settings, build_service
    from chat_app.ui import CONCURRENCY, build_ui
    from chat_app.warmup import StatsWarmup

    service, _ = build_service(Settings(db=str(folder / "ledger.db")))
    warmup = StatsWarmup(service.editor).start()
    warmup.wait()
    service.editor.context_templates()  # once per model, cached on disk: outside the timing
    instrument(service)
    demo = build_ui(service, warmup)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    return url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--url", help="drive an app already running there (no breakdown)")
    ap.add_argument("--no-preview", action="store_true", help="apply without the preview a form user runs first")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from gradio_client import Client

    url = args.url or serve(Path(tempfile.mkdtemp(prefix="rome-chat-bench-")))
    client = Client(url, verbose=False)
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    totals, checked, rows = [], [], []
    for case in cases:
        subject, relation, target = case.subject, case.request().relation, case.target_new
        if not args.no_preview:
            client.predict(subject, relation, target, api_name="/preview")
        SPANS.clear()
        COUNTS.clear()
        t0 = time.perf_counter()
        result, _ = client.predict(subject, relation, target, case.paraphrases[0], case.neighbourhood[0], 9, 20, 2.0,
                                   0.0625, "", api_name="/apply_edit")  # fmt: skip
        totals.append(time.perf_counter() - t0)
        client.predict(api_name="/apply_edit_checks")  # what the browser chains: the checks answered meanwhile
        checked.append(time.perf_counter() - t0)
        time.sleep(0.5)  # let the refresh the browser chains after apply finish (not in the client's time)
        rows.append(dict(SPANS))
        print(f"{totals[-1]:5.2f} s applied, {checked[-1]:5.2f} s every check answered · "
              + " · ".join(f"{k} {v:.2f} s ({COUNTS[k]}×)" for k, v in SPANS.items())
              + f" · {result.splitlines()[0][:60]}", flush=True)  # fmt: skip
        edit_id = int(result.split("#", 1)[1].split("*", 1)[0].split()[0])
        client.predict(edit_id, api_name="/revert")
    print(f"median end to end {statistics.median(totals):.2f} s over {len(totals)} edits "
          f"(min {min(totals):.2f}, max {max(totals):.2f}); every check answered {statistics.median(checked):.2f} s")  # fmt: skip
    for label in sorted({k for r in rows for k in r}):
        print(f"  median {label}: {statistics.median(r.get(label, 0.0) for r in rows):.3f} s")


if __name__ == "__main__":
    main()
