"""How often the unedited model's own greedy answer names the true object, on the prompt and on its paraphrases.

    python bench/paraphrase_ceiling.py --n 1000

GP asks the edited model's greedy completion of each paraphrase to name the new object. This
measures the same for facts the model already holds: with ``evaluate``'s generation settings
(``GenSettings``: 10-token greedy completions, the first 2 paraphrases), the share of prompts whose
completion names the true object, of all paraphrases, and of the paraphrases of the facts whose
prompt the model answers. The last is the model's own paraphrase consistency for facts it knows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sweep import DATA  # noqa: E402
from editing import load_model  # noqa: E402
from editing.evaluation.chat_metrics import GenSettings, names  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.generation import greedy_completions  # noqa: E402


def percent(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):.1f} % of {len(flags)}" if flags else "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tok = load_model()
    settings = GenSettings()
    prompt_named, para_named, para_known = [], [], []
    for case in sample_cases(load_cases(DATA)[0], args.n, args.seed):
        paras = list(case.paraphrases[: settings.max_paraphrases])
        done = greedy_completions(model, tok, [case.prompt, *paras], settings.completion_tokens)
        known = names(done[0], case.target_true)
        prompt_named.append(known)
        named = [names(c, case.target_true) for c in done[1:]]
        para_named += named
        if known:
            para_known += named
    print(f"{args.n} cases (seed {args.seed}); the completion names the true object:")
    print(f"  prompt: {percent(prompt_named)}")
    print(f"  paraphrases: {percent(para_named)}")
    print(f"  paraphrases of the cases whose prompt it names: {percent(para_known)}")


if __name__ == "__main__":
    main()
