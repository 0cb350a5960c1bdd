"""Batched against one-by-one value optimisation on the default model: seconds per fact and agreement.

    python bench/value_batch_speed.py --n 10 --rounds 2 --groups 10

The same N CounterFact facts (layer 9, the model's settings): each round times ``optimise_value``
fact by fact, then ``optimise_values`` on all of them (for each ``--groups`` size), alternately, so
a busy machine slows both alike; the ratio is printed per round. Also printed: the largest relative
difference ‖δ_batch − δ_solo‖ / ‖δ_solo‖ over the facts and whether every fact took the same steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sweep import DATA  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.rome import compute_key  # noqa: E402
from editing.value import optimise_value  # noqa: E402
from editing.value_batch import optimise_values  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--groups", type=int, nargs="+", default=[32], help="facts per batched loop")
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    hp, pad = editor.hparams, tok.pad_token_id
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    rows = [editor.rows(c.request(), hp) for c in cases]
    keys = torch.stack([compute_key(model, hp.layer, k, pad) for k, _, _ in rows])
    facts = [(v, kl) for _, v, kl in rows]
    print(f"{args.n} facts, layer {hp.layer}, {torch.get_num_threads()} threads", flush=True)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        solo = [optimise_value(model, hp, k, v, kl, pad, editor.method) for k, (v, kl) in zip(keys, facts)]
        solo_s = (time.perf_counter() - t0) / args.n
        line = f"round {r + 1}: one by one {solo_s:.2f} s/fact (mean steps {statistics.mean(s.steps for s in solo):.1f})"
        for group in args.groups:
            t0 = time.perf_counter()
            batch = optimise_values(model, hp, keys, facts, pad, editor.method, group=group)
            batch_s = (time.perf_counter() - t0) / args.n
            worst = max(float((b.delta - s.delta).norm() / s.delta.norm()) for b, s in zip(batch, solo))
            same = all(b.steps == s.steps for b, s in zip(batch, solo))
            line += (f"; batched (group {group}) {batch_s:.2f} s/fact, {solo_s / batch_s:.2f}x, "
                     f"max rel. δ difference {worst:.1e}, same steps {same}")  # fmt: skip
        print(line, flush=True)


if __name__ == "__main__":
    main()
