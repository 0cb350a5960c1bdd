"""Causal tracing speed: the batched ``fast`` method against the one-pass-per-restoration ``plain`` one.

    python -m bench.trace_speed            # the Eiffel Tower prompt
    python -m bench.trace_speed --more     # and two more prompts

Both methods run in this process on the default model; the figures are wall-clock and CPU
seconds for all three heatmaps, their ratio, and the largest difference between the scores.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from editing.loading import load_model
from editing.tracing import KINDS, embedding_std, trace

PROMPTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Michael Jordan plays the sport of", "Michael Jordan"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
]


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--more", action="store_true", help="also time two more prompts")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--fast-only", action="store_true", help="skip the slow reference method")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="states to restore")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    noise = 3 * embedding_std(model, tok)  # measured once (cached on disk), outside the timings
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch threads: {torch.get_num_threads()}, CPUs: {os.cpu_count()}, load average: {load}")
    print(f"noise std: {noise:.4f}, samples: {args.samples}, kinds: {' '.join(args.kinds)}, window 10")
    header = f"{'prompt':<46} {'tokens':>6} {'fast s':>8} {'(cpu)':>7} {'plain s':>8} {'(cpu)':>7} {'ratio':>6}"
    print(header + f" {'max |Δ|':>9}")
    for prompt, subject in PROMPTS if args.more else PROMPTS[:1]:
        def run(method: str):
            return trace(model, tok, prompt, subject, samples=args.samples, noise=noise, method=method,
                         kinds=args.kinds)

        fast, fast_wall, fast_cpu = _timed(lambda: run("fast"))
        row = f"{prompt:<46} {len(fast.tokens):>6} {fast_wall:>8.1f} {fast_cpu:>7.1f}"
        if not args.fast_only:
            plain, plain_wall, plain_cpu = _timed(lambda: run("plain"))
            diff = max(float((fast.scores[k] - plain.scores[k]).abs().max()) for k in args.kinds)
            row += f" {plain_wall:>8.1f} {plain_cpu:>7.1f} {plain_wall / fast_wall:>6.1f} {diff:>9.2e}"
        print(row + f"   answer {fast.answer!r} p={fast.clean_prob:.3f}", flush=True)


if __name__ == "__main__":
    main()
