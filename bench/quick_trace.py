"""Quick trace (attribution patching) against the exact causal trace on facts the default model knows.

    nice -n 10 python -m bench.quick_trace --n 20 --samples 3
    python -m bench.quick_trace --n 20 --few 2 3 --precision float32
    python -m bench.quick_trace --n 8 --few 10 --few-kinds mlp    # the exact trace against itself, other noise

For each of the first ``--n`` facts of ``../shared/data/known_1000.json`` that the model knows
(as in ``bench/trace_known_facts.py``), runs the exact trace (MLP only, bfloat16 arithmetic,
``--samples`` noise samples) and the quick trace with the same noise (same seed and samples),
and the quick trace of all three heatmaps with the Locate tab's 10 samples. Prints per fact the
Spearman rank correlation of the MLP indirect-effect heatmaps (tokens from the first subject
token on; earlier tokens are exactly the corrupted run in both), the suggested layer of each,
and the times; then the medians, the mean correlation and how often the suggested layers agree.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time

import torch

from bench.trace_known_facts import DATA, knows
from editing.loading import load_model
from editing.tracing.quick import quick_trace
from editing.tracing import best_at_last_subject, embedding_std, trace

log = logging.getLogger("quick_trace")
LOCATE_SAMPLES = 10  # the Locate tab's default


def ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.flatten().argsort()
    out = torch.empty_like(order, dtype=torch.float64)
    out[order] = torch.arange(len(order), dtype=torch.float64)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="facts to compare")
    ap.add_argument("--samples", type=int, default=3, help="noise samples of the exact trace (and the matched quick one)")
    ap.add_argument("--precision", default="bfloat16", help="arithmetic of the exact trace")
    ap.add_argument("--steps", type=int, nargs="+", default=[1], help="path points of the quick trace (1: plain attribution patching)")
    ap.add_argument("--few", type=int, nargs="+", default=None, metavar="S",
                    help="instead: the exact trace with S samples (other noise) against the exact trace with "
                         f"{LOCATE_SAMPLES}, timed")
    ap.add_argument("--few-kinds", nargs="+", default=["hidden", "mlp", "attn"],
                    help="with --few: the heatmaps the few-sample trace computes (mlp alone: the reference's own noise)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tok = load_model()
    noise = 3 * embedding_std(model, tok)
    facts = list(itertools.islice((r for r in json.loads(DATA.read_text()) if knows(model, tok, r)), args.n))
    if args.few:
        few_samples(model, tok, facts, noise, args)
        return
    rows: dict[int, list] = {m: [] for m in args.steps}  # type: ignore[type-arg]
    print("fact | steps | rho (same noise) | rho (10 samples) | layer exact / quick | exact s | quick s (3 maps)", flush=True)
    for record in facts:
        prompt, subject = record["prompt"], record["subject"]
        t0 = time.perf_counter()
        exact = trace(model, tok, prompt, subject, samples=args.samples, noise=noise, kinds=("mlp",),
                      precision=args.precision)  # fmt: skip
        t_exact = time.perf_counter() - t0
        first = exact.subject_range[0]
        effect = exact.indirect_effect("mlp")[first:]
        for m in args.steps:
            matched = quick_trace(model, tok, prompt, subject, samples=args.samples, noise=noise, kinds=("mlp",), steps=m)
            t0 = time.perf_counter()
            full = quick_trace(model, tok, prompt, subject, samples=LOCATE_SAMPLES, noise=noise, steps=m)
            t_quick = time.perf_counter() - t0
            rho = spearman(effect, matched.indirect_effect("mlp")[first:])
            rho10 = spearman(effect, full.indirect_effect("mlp")[first:])
            layers = best_at_last_subject(exact)[0], best_at_last_subject(matched)[0], best_at_last_subject(full)[0]
            rows[m].append((rho, rho10, layers, t_exact, t_quick))
            print(f"{subject[:28]:28s} | {m:2d} | {rho:5.3f} | {rho10:5.3f} | {layers[0]:2d} / {layers[1]:2d} ({layers[2]:2d}) | "
                  f"{t_exact:6.1f} | {t_quick:5.2f}", flush=True)  # fmt: skip
    for m, got in rows.items():
        summarise(m, got, args)


def few_samples(model, tok, facts: list, noise: float, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def,type-arg]
    """The exact trace with fewer noise samples (seed 1: noise independent of the reference's) against
    the Locate tab's exact trace (``LOCATE_SAMPLES`` samples, seed 0), in ``--precision``."""
    rows: dict[int, list] = {s: [] for s in args.few}  # type: ignore[type-arg]
    print(f"fact | samples | rho (MLP, vs {LOCATE_SAMPLES} samples) | layer ref / few | ref s (MLP) | few s", flush=True)
    for record in facts:
        prompt, subject = record["prompt"], record["subject"]
        t0 = time.perf_counter()
        ref = trace(model, tok, prompt, subject, samples=LOCATE_SAMPLES, noise=noise, kinds=("mlp",), precision=args.precision)
        t_ref = time.perf_counter() - t0
        first = ref.subject_range[0]
        for s in args.few:
            t0 = time.perf_counter()
            few = trace(model, tok, prompt, subject, samples=s, noise=noise, seed=1, precision=args.precision,
                        kinds=tuple(args.few_kinds))  # fmt: skip
            t_few = time.perf_counter() - t0
            rho = spearman(ref.indirect_effect("mlp")[first:], few.indirect_effect("mlp")[first:])
            layers = best_at_last_subject(ref)[0], best_at_last_subject(few)[0]
            rows[s].append((rho, layers, t_ref, t_few))
            print(f"{subject[:28]:28s} | {s:2d} | {rho:5.3f} | {layers[0]:2d} / {layers[1]:2d} | {t_ref:5.1f} | {t_few:5.2f}", flush=True)
    for s, got in rows.items():
        n = len(got)
        print(f"--- exact trace with {s} samples ({args.precision}), {n} facts: MLP rank correlation median "
              f"{statistics.median(r[0] for r in got):.3f} mean {statistics.mean(r[0] for r in got):.3f} "
              f"min {min(r[0] for r in got):.3f}; suggested layer same {sum(r[1][0] == r[1][1] for r in got)}/{n}, "
              f"within one {sum(abs(r[1][0] - r[1][1]) <= 1 for r in got)}/{n}; median "
              f"{statistics.median(r[3] for r in got):.2f} s for {'+'.join(args.few_kinds)} (reference MLP only {statistics.median(r[2] for r in got):.1f} s)")


def summarise(m: int, rows: list, args: argparse.Namespace) -> None:  # type: ignore[type-arg]
    """The medians over facts for the quick trace with ``m`` path points."""
    n = len(rows)
    print(f"--- quick trace with {m} path point(s)")
    same = sum(r[2][0] == r[2][1] for r in rows)
    near = sum(abs(r[2][0] - r[2][1]) <= 1 for r in rows)
    same10 = sum(r[2][0] == r[2][2] for r in rows)
    print(f"{n} facts: MLP rank correlation (same noise) median {statistics.median(r[0] for r in rows):.3f} "
          f"mean {statistics.mean(r[0] for r in rows):.3f} min {min(r[0] for r in rows):.3f}; "
          f"(quick with {LOCATE_SAMPLES} samples) median {statistics.median(r[1] for r in rows):.3f} "
          f"mean {statistics.mean(r[1] for r in rows):.3f}")  # fmt: skip
    print(f"suggested layer at the last subject token: same {same}/{n}, within one layer {near}/{n}; "
          f"quick with {LOCATE_SAMPLES} samples same {same10}/{n}")  # fmt: skip
    print(f"time: exact MLP only ({args.samples} samples, {args.precision}) median "
          f"{statistics.median(r[3] for r in rows):.1f} s; quick, three heatmaps ({LOCATE_SAMPLES} samples) median "
          f"{statistics.median(r[4] for r in rows):.2f} s, ratio {statistics.median(r[3] / r[4] for r in rows):.0f}×")  # fmt: skip

if __name__ == "__main__":
    main()
