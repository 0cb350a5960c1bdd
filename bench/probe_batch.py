"""Probe completions of one in-app edit: one by one against one left-padded batch.

    python -m bench.probe_batch --n 20

For each CounterFact development case, the three prompts an edit checks (the edited prompt, a
paraphrase and a neighbour) are completed greedily one after the other, then as one left-padded
batch (``editing.generation.greedy_completions``, which ``evaluate`` uses too). Prints both times,
their ratio and how many batched answers equal the one-by-one answers (a padded batch runs other
matrix shapes, so a near tie can break the other way).
"""
from __future__ import annotations

import argparse
import statistics
import time

from chat_app.probes import complete
from editing import load_model
from editing.evaluation.datasets import load_cases, sample_cases
from editing.generation import greedy_completions
from bench.sweep import DATA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model()
    alone_s, batch_s, same, total = [], [], 0, 0
    for case in sample_cases(load_cases(DATA)[0], args.n, args.seed):
        prompts = [case.prompt, case.paraphrases[0], case.neighbourhood[0]]
        t0 = time.perf_counter()
        alone = [complete(model, tok, p) for p in prompts]
        alone_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched = greedy_completions(model, tok, prompts, 8)
        batch_s.append(time.perf_counter() - t0)
        same += sum(a == b for a, b in zip(alone, batched))
        total += len(prompts)
    print(f"{len(alone_s)} cases × 3 prompts: median one by one {statistics.median(alone_s):.2f} s, "
          f"one batch {statistics.median(batch_s):.2f} s, ratio {statistics.median(a / b for a, b in zip(alone_s, batch_s)):.2f}×; "
          f"batched answers equal to one-by-one: {same}/{total}")  # fmt: skip


if __name__ == "__main__":
    main()
