"""Sweep ROME settings on CounterFact development cases: quality (ES/PS/NS) and edit time per setting.

    python bench/sweep.py --n 20 --layers 3 6 9 12 --samples 2000 --value-templates 21 11 --lr 0.5

Prints one row per setting; used to choose the default layer, statistics sample count,
number of value templates and learning rate (see README, "How the defaults were chosen").
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editing import RomeEditor, load_model  # noqa: E402
from editing.datasets import load_cases, sample_cases  # noqa: E402
from editing.metrics import object_probs  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"


def scores(model, tok, case) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    rewrites = [case.prompt, *case.paraphrases]
    prompts = [p for p in rewrites for _ in range(2)] + [p for p in case.neighbourhood for _ in range(2)]
    objects = [case.target_new, case.target_true] * len(rewrites)
    objects += [case.neighbourhood_answer, case.target_new] * len(case.neighbourhood)
    probs = object_probs(model, tok, prompts, objects)
    wins = [float(probs[i] > probs[i + 1]) for i in range(0, len(probs), 2)]
    n = len(rewrites)
    return wins[0], statistics.mean(wins[1:n]) if n > 1 else float("nan"), statistics.mean(wins[n:]) if wins[n:] else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[9])
    ap.add_argument("--samples", type=int, nargs="+", default=[2000])
    ap.add_argument("--value-templates", type=int, nargs="+", default=[21])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.5])
    ap.add_argument("--method", default="fast")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok, method=args.method)
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    base = [scores(model, tok, c) for c in cases]
    print(f"unedited: ES {100 * statistics.mean(s[0] for s in base):.1f} NS {100 * statistics.mean(s[2] for s in base):.1f}", flush=True)
    print("layer samples vtempl lr    ES    PS    NS   median_s mean_steps", flush=True)
    for layer, n_samples, vt, lr in itertools.product(args.layers, args.samples, args.value_templates, args.lr):
        editor.cov(layer, n_samples)  # statistics outside the timing
        rows, times, steps = [], [], []
        for case in cases:
            t0 = time.perf_counter()
            try:
                edit = editor.compute(case.request(layer), stats_samples=n_samples, value_templates=vt, lr=lr)
            except ValueError as err:
                print(f"  skipped case {case.case_id}: {err}", flush=True)
                continue
            editor.apply(edit)
            times.append(time.perf_counter() - t0)
            steps.append(edit.stats["steps"])
            rows.append(scores(model, tok, case))
            editor.revert(edit)
            if args.verbose:
                print(f"  case {case.case_id}: steps {steps[-1]} time {times[-1]:.1f}s ES/PS/NS {rows[-1]}", flush=True)
        mean = lambda i: 100 * statistics.mean(r[i] for r in rows)  # noqa: E731
        print(f"{layer:5d} {n_samples:7d} {vt:6d} {lr:4.2f} {mean(0):5.1f} {mean(1):5.1f} {mean(2):5.1f} "
              f"{statistics.median(times):8.2f} {statistics.mean(steps):6.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
