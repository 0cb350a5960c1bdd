"""Probe completions of one in-app edit: one by one (before the change) against remembered + batched (now).

    nice -n 10 python -m bench.probe_batch --n 8

For each CounterFact development case: the edited prompt, one paraphrase and one neighbour.
"one by one" is what ``apply`` did: each prompt completed before and again after (6 generations;
the after ones are run on the same weights here, which costs the same). "batched" is what it does
now: the edited prompt's answer comes from the preview (remembered), the other two are one batch,
and the three after-checks one batch. Prints both times, their ratio and whether every batched
answer equals the one-by-one answer (greedy decoding with left padding can differ in near ties).
"""
from __future__ import annotations

import argparse
import statistics
import time

from chat_app.completions import complete_batch
from chat_app.probes import complete
from editing import load_model
from editing.evaluation.datasets import load_cases, sample_cases
from bench.sweep import DATA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model()
    old, new, same, total = [], [], 0, 0
    for case in sample_cases(load_cases(DATA)[0], args.n, args.seed):
        prompts = [case.prompt, case.paraphrases[0], case.neighbourhood[0]]
        t0 = time.perf_counter()
        alone = [complete(model, tok, p) for p in prompts] + [complete(model, tok, p) for p in prompts]
        old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched = complete_batch(model, tok, prompts[1:]) + complete_batch(model, tok, prompts)
        new.append(time.perf_counter() - t0)
        same += sum(a == b for a, b in zip(alone[1:3] + alone[3:], batched))
        total += 5
        print(f"one by one {old[-1]:5.2f} s · batched {new[-1]:5.2f} s · {batched[2]!r:.40}", flush=True)
    print(f"median one by one {statistics.median(old):.2f} s, batched {statistics.median(new):.2f} s, "
          f"ratio {statistics.median(o / n for o, n in zip(old, new)):.1f}×; batched answers equal to one-by-one: "
          f"{same}/{total}")  # fmt: skip


if __name__ == "__main__":
    main()
