"""Causal tracing speed: the batched ``fast`` method against the one-pass-per-restoration ``plain`` one.

    python -m bench.trace_speed            # the Eiffel Tower prompt
    python -m bench.trace_speed --more     # and two more prompts

Both methods run in this process on the default model; the figures are wall-clock and CPU
seconds for all three heatmaps, their ratio, and the largest difference between the scores.
The fast method runs once per ``--precision`` (default: float32, exact, then bfloat16); the
bfloat16 row's ratio and difference are against the float32 fast run, and both rows name the
layer each would suggest. The plain reference runs in float32.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from editing.loading import load_model
from editing.precision import PRECISIONS
from editing.tracing import KINDS, embedding_std, suggest_layer, trace

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
    parser.add_argument("--precision", nargs="+", default=["float32", "bfloat16"], choices=PRECISIONS[1:],
                        help="arithmetic of the fast runs (the plain reference is float32)")  # fmt: skip
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time the first trace cold (default: one short trace per precision first)")  # fmt: skip
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
    print(f"{'prompt':<46} {'tokens':>6} {'method':<16} {'wall s':>7} {'(cpu)':>7} {'speed-up':>8} {'max |Δ|':>9}"
          f" {'layer':>5}")  # fmt: skip
    for prompt, subject in PROMPTS if args.more else PROMPTS[:1]:
        def run(method: str, precision: str = "float32"):
            return trace(model, tok, prompt, subject, samples=args.samples, noise=noise, method=method,
                         kinds=args.kinds, precision=precision)  # fmt: skip

        def row(name: str, result, wall: float, cpu: float, base=None, base_wall: float | None = None) -> None:
            ratio = f"{base_wall / wall:>7.1f}x" if base_wall else f"{'':>8}"
            diff = max(float((result.scores[k] - base.scores[k]).abs().max()) for k in args.kinds) if base else None
            layer = suggest_layer(result) if "mlp" in args.kinds else "-"
            print(f"{prompt:<46} {len(result.tokens):>6} {name:<16} {wall:>7.1f} {cpu:>7.1f} {ratio} "
                  f"{'' if diff is None else f'{diff:.2e}':>9} {layer:>5}", flush=True)  # fmt: skip

        fast: dict[str, tuple] = {}
        for precision in args.precision:
            if args.warmup:  # the kernels' first calls (oneDNN builds them per shape) stay out of the timing
                trace(model, tok, prompt, subject, samples=1, noise=noise, kinds=["mlp"], precision=precision)
            fast[precision] = _timed(lambda: run("fast", precision))
            ref = fast.get("float32") if precision != "float32" else None
            row(f"fast {precision}", *fast[precision], *((ref[0], ref[1]) if ref else ()))
        if not args.fast_only:
            plain, plain_wall, plain_cpu = _timed(lambda: run("plain"))
            print(f"{prompt:<46} {len(plain.tokens):>6} {'plain float32':<16} {plain_wall:>7.1f} {plain_cpu:>7.1f}")
            for precision, (result, wall, _cpu) in fast.items():
                diff = max(float((result.scores[k] - plain.scores[k]).abs().max()) for k in args.kinds)
                print(f"  fast {precision} against plain: {plain_wall / wall:.1f}x faster, max |Δ| {diff:.2e}")
        answer = next(iter(fast.values()))[0]
        print(f"  answer {answer.answer!r} p={answer.clean_prob:.3f}", flush=True)


if __name__ == "__main__":
    main()
