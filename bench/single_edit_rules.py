"""Seconds per single edit: the app's r-ROME edit against a batch of one over layers (MEMIT-1, exact keys).

    python bench/single_edit_rules.py --n 12

For each CounterFact development case, alternately (so drifting load hits both alike): the r-ROME
edit with the default hyperparameters (``editor.compute``), and ``editor.compute_batch([request],
batch_keys="exact")``, each computed, applied and reverted. Statistics and context templates are
read before timing. Prints each rule's median and mean and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sweep import DATA  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    editor.context_templates()
    for layer in editor.batch_layers(editor.hparams):
        editor.cov(layer)
    rules = {
        "r-ROME (app default)": editor.compute,
        "MEMIT-1, batch_keys=exact": lambda r: editor.compute_batch([r], batch_keys="exact"),
    }
    times: dict[str, list[float]] = {name: [] for name in rules}
    for case in sample_cases(load_cases(DATA)[0], args.n, args.seed):
        for name, compute in rules.items():
            t0 = time.perf_counter()
            edit = compute(case.request())
            editor.apply(edit)
            times[name].append(time.perf_counter() - t0)
            editor.revert(edit)
    for name, ts in times.items():
        print(f"{name:28s} n={len(ts)} median {statistics.median(ts):.2f} s  mean {statistics.mean(ts):.2f} s")
    a, b = (statistics.median(ts) for ts in times.values())
    print(f"ratio of the medians (MEMIT-1 / r-ROME): {b / a:.2f}")


if __name__ == "__main__":
    main()
