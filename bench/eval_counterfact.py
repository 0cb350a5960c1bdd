"""Where an evaluation's time goes, per case: scoring, fluency generation, FT-L and ROME.

    python bench/eval_counterfact.py --data ../shared/data/counterfact_dev.json --n 3

Prints the mean seconds of each stage per case and its share of the whole.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.evaluation.ftl import FineTuneL, FTLHyperParams  # noqa: E402
from editing.evaluation.metrics import GenerationSettings, score_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tok = load_model(args.model)
    editor = RomeEditor(model, tok)
    editor.cov(editor.hparams.layer)
    editor.context_templates()
    ftl = FineTuneL(model, tok, FTLHyperParams(editor.hparams.layer))
    cases = sample_cases(load_cases(args.data)[0], args.n, args.seed)
    seconds: dict[str, float] = {"probabilities": 0.0, "generation": 0.0, "FT-L": 0.0, "ROME compute": 0.0}

    def timed(stage: str, fn):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        out = fn()
        seconds[stage] += time.perf_counter() - start
        return out

    for case in cases:
        timed("probabilities", lambda: score_case(model, tok, case, GenerationSettings(max_new_tokens=0), 0))
        timed("generation", lambda: score_case(model, tok, case, GenerationSettings(), 0))
        timed("FT-L", lambda: ftl.apply(case))
        ftl.restore()
        timed("ROME compute", lambda: editor.compute(case.request()))
    seconds["generation"] -= seconds["probabilities"]  # the second scoring also recomputed probabilities
    # One independent case scores 3 rows (unedited, FT-L, ROME) and runs each method once.
    per_case = 3 * (seconds["probabilities"] + seconds["generation"]) + seconds["FT-L"] + seconds["ROME compute"]
    print(f"{len(cases)} cases, layer {editor.hparams.layer}")
    for stage, total in seconds.items():
        rows = 3 if stage in ("probabilities", "generation") else 1
        share = rows * total / per_case
        print(f"{stage:<14} {total / len(cases):7.2f} s per call  x{rows}  {100 * share:5.1f}% of a case")
    print(f"estimated independent evaluation: {per_case / len(cases):.1f} s per case")


if __name__ == "__main__":
    main()
