"""The form's chat row: the reply's first sentence against a 48-token reply, on development facts (unedited model).

    python bench/chat_probe_length.py --n 60

For each fact's chat question (``chat_app.probes.chat_question``) prints nothing per case, then:
how often the first-sentence reply is a prefix of the 48-token one (greedy decoding: it should
always be), how often the two agree on naming the true object (the check the form makes), and
the median seconds of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_app.probes import CHAT_PROBE, CHAT_PROBE_MIN_TOKENS, chat_question  # noqa: E402
from editing import load_model  # noqa: E402
from editing.evaluation.chat_metrics import names  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.generation import chat_reply  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    model, tok = load_model()
    prefix = agree = named_full = named_first = 0
    times: dict[str, list[float]] = {"48 tokens": [], "first sentence": []}
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    for case in cases:
        question = chat_question(case.subject, case.request().relation)
        t0 = time.perf_counter()
        full = chat_reply(model, tok, question, CHAT_PROBE)
        times["48 tokens"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        first = chat_reply(model, tok, question, CHAT_PROBE, sentence_min_tokens=CHAT_PROBE_MIN_TOKENS)
        times["first sentence"].append(time.perf_counter() - t0)
        prefix += full.startswith(first)
        a, b = names(full, case.target_true), names(first, case.target_true)
        agree += a == b
        named_full += a
        named_first += b
    n = len(cases)
    print(f"{n} questions: first sentence is a prefix of the 48-token reply in {prefix}/{n}; "
          f"naming the true object agrees in {agree}/{n} (48 tokens name it {named_full}, first sentence {named_first})")  # fmt: skip
    for label, values in times.items():
        print(f"  median {label}: {statistics.median(values):.2f} s")


if __name__ == "__main__":
    main()
