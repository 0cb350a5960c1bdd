"""MEMIT batch edits on CounterFact development cases: quality (ES/PS/NS) and seconds per fact.

    python bench/memit_batch.py --n 50 --sets 9 7,8,9 --weights 100 1000 10000 --rome 10 [--value-templates 11 5]

For each layer set and λ (mom2_weight): one batch of all N facts, applied at once, then every case
scored (efficacy, paraphrase, neighbourhood: the share of prompts where the new object beats the
old), the mean value-optimisation steps and the largest per-layer update norm. The unedited scores
are printed first. The facts' value deltas (z_i, at the set's last layer on the unedited weights)
depend on neither λ nor the lower layers, so they are computed once per last layer and reused: the
seconds per fact of compute_batch are shown for the first row of each last layer, where they were
computed, and are "-" after. ``--rome K`` also times the first K of the facts computed one by one with
ROME (``editor.compute`` at that last layer, each on the unedited weights), in the same process, and
prints the ratio of the seconds per fact.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import editing.value_batch as value_batch  # noqa: E402
from bench.sweep import DATA, scores  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402


def reuse_values() -> dict:
    """Make ``optimise_values`` remember its results per (layer, facts): the deltas do not depend on λ."""
    memo: dict = {}
    compute = value_batch.optimise_values

    def remembered(model, hp, keys, facts, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = (hp.layer, tuple((tuple(r.input_ids for r in v), kl.input_ids) for v, kl in facts))
        if key not in memo:
            memo[key] = compute(model, hp, keys, facts, *args, **kwargs)
        return memo[key]

    value_batch.optimise_values = remembered
    return memo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=["5,6,7,8,9"], help="layer sets, each comma-separated: 9 7,8,9")
    ap.add_argument("--weights", type=float, nargs="+", default=[1000.0])
    ap.add_argument("--samples", type=int, default=None, help="corpus texts for each layer's C (default: the model's)")
    ap.add_argument("--rome", type=int, default=0, metavar="K", help="also time K of the facts one by one with ROME")
    ap.add_argument("--value-templates", type=int, nargs="+", default=[None], metavar="N",
                    help="value prompts per fact (default: the model's); each N is a separate set of rows")
    args = ap.parse_args()
    sets = [tuple(int(x) for x in s.split(",")) for s in args.sets]
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    if args.samples:
        editor.hparams = editor.hparams.replace(stats_samples=args.samples)
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    mean = lambda rows, i: 100 * statistics.mean(r[i] for r in rows)  # noqa: E731
    base = [scores(model, tok, c) for c in cases]
    print(f"unedited: ES {mean(base, 0):.1f} PS {mean(base, 1):.1f} NS {mean(base, 2):.1f}", flush=True)
    for layer in sorted({x for s in sets for x in s}):
        editor.cov(layer, progress=None)  # statistics outside the timing
    editor.context_templates()  # generated once, outside the timing
    rome: dict[int, float] = {}
    for last in sorted({s[-1] for s in sets}) if args.rome else ():
        t0 = time.perf_counter()
        steps = [editor.compute(c.request(), layer=last).stats["steps"] for c in cases[: args.rome]]
        rome[last] = (time.perf_counter() - t0) / len(steps)
        print(f"ROME one by one at layer {last}, {len(steps)} facts: {rome[last]:.2f} s/fact, "
              f"mean steps {statistics.mean(steps):.1f}", flush=True)  # fmt: skip
    reuse_values()
    timed: set[tuple[int, int]] = set()
    print("prompts layers           λ       ES    PS    NS   s/fact  value s/fact  steps  max ||ΔW_l||", flush=True)
    for n_values, layers, weight in itertools.product(args.value_templates, sets, args.weights):
        n_values = n_values or editor.hparams.value_templates
        t0 = time.perf_counter()
        batch = editor.compute_batch([c.request() for c in cases], batch_layers=layers, mom2_weight=weight,
                                     value_templates=n_values)  # fmt: skip
        per_fact = (time.perf_counter() - t0) / len(cases)
        first = (layers[-1], n_values) not in timed
        timed.add((layers[-1], n_values))
        editor.apply(batch)
        rows = [scores(model, tok, c) for c in cases]
        norms = []
        for j in range(len(layers)):
            delta = sum(torch.outer(f[j].value_dir, f[j].key_dir).double() for f in batch.facts)
            norms.append(float(delta.norm()))
        editor.revert(batch)
        speed = f"{per_fact:7.2f}  {batch.stats['value_s'] / len(cases):12.2f}" if first else f"{'-':>7}  {'-':>12}"
        ratio = f"  (ROME one by one / batch: {rome[layers[-1]] / per_fact:.1f}x)" if first and rome else ""
        print(f"{n_values:7d} {','.join(map(str, layers)):15} {weight:7.0f} {mean(rows, 0):6.1f} {mean(rows, 1):5.1f} "
              f"{mean(rows, 2):5.1f} {speed}  {batch.stats['mean_steps']:5.1f}  {max(norms):.3g}{ratio}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
