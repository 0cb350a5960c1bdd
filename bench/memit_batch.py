"""MEMIT batch edits on CounterFact development cases: quality (ES/PS/NS) and seconds per fact.

    python bench/memit_batch.py --n 20 --layers 5 6 7 8 9 --weights 100 1000 10000 --samples 250 [--rome]

For each λ (mom2_weight): one batch of all N facts, applied at once, then every case scored
(efficacy, paraphrase, neighbourhood: the share of prompts where the new object beats the old),
the wall time per fact of compute_batch (and of its value optimisation), the mean optimisation
steps and the largest per-layer update norm. The unedited scores are printed first. ``--rome``
also times the same N facts computed one by one with ROME (``editor.compute`` at the last layer,
each on the unedited weights), in the same process, and prints the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sweep import DATA, scores  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    ap.add_argument("--weights", type=float, nargs="+", default=[1000.0])
    ap.add_argument("--samples", type=int, default=None, help="corpus texts for each layer's C (default: the model's)")
    ap.add_argument("--rome", action="store_true", help="also time the same facts edited one by one with ROME")
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    if args.samples:
        editor.hparams = editor.hparams.replace(stats_samples=args.samples)
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    mean = lambda rows, i: 100 * statistics.mean(r[i] for r in rows)  # noqa: E731
    base = [scores(model, tok, c) for c in cases]
    print(f"unedited: ES {mean(base, 0):.1f} PS {mean(base, 1):.1f} NS {mean(base, 2):.1f}", flush=True)
    for layer in args.layers:
        editor.cov(layer, progress=None)  # statistics outside the timing
    editor.context_templates()  # generated once, outside the timing
    rome_per_fact = None
    if args.rome:
        t0 = time.perf_counter()
        steps = [editor.compute(c.request(), layer=args.layers[-1]).stats["steps"] for c in cases]
        rome_per_fact = (time.perf_counter() - t0) / len(cases)
        print(f"ROME one by one at layer {args.layers[-1]}: {rome_per_fact:.2f} s/fact, "
              f"mean steps {statistics.mean(steps):.1f}", flush=True)  # fmt: skip
    print("layers           λ       ES    PS    NS   s/fact  value s/fact  steps  max ||ΔW_l||", flush=True)
    for weight in args.weights:
        t0 = time.perf_counter()
        batch = editor.compute_batch([c.request() for c in cases], batch_layers=tuple(args.layers), mom2_weight=weight)
        per_fact = (time.perf_counter() - t0) / len(cases)
        value_per_fact = batch.stats["value_s"] / len(cases)
        editor.apply(batch)
        rows = [scores(model, tok, c) for c in cases]
        norms = []
        for j in range(len(args.layers)):
            delta = sum(torch.outer(f[j].value_dir, f[j].key_dir).double() for f in batch.facts)
            norms.append(float(delta.norm()))
        editor.revert(batch)
        print(f"{str(args.layers):15} {weight:7.0f} {mean(rows, 0):6.1f} {mean(rows, 1):5.1f} {mean(rows, 2):5.1f} "
              f"{per_fact:7.2f}  {value_per_fact:12.2f}  {batch.stats['mean_steps']:5.1f}  {max(norms):.3g}"
              + ("" if rome_per_fact is None else f"  (ROME one by one / batch: {rome_per_fact / per_fact:.1f}x)"),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
