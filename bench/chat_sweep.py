"""Chat-aware edit settings on CounterFact development cases: ES/PS/NS and what the model says (GE/GP/GL/CE/CO/NC).

    python bench/chat_sweep.py --n 24 --seed 1 --variant '{}' --variant '{"chat_values": 2}'

Each ``--variant`` is a JSON object of hyperparameter overrides (``{}``: the defaults). The unedited
model is scored once (the baseline row); every variant edits each case alone, scores it, and reverts.
Prints one row per variant (success rates in %), the median edit time and the mean steps;
``--json`` keeps every case's question, reply and completion.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sweep import timed_edit  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.chat_metrics import GenSettings  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.generation import ChatSettings  # noqa: E402
from editing.evaluation.metrics import GenerationSettings, aggregate, score_case  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"
COLUMNS = ("ES", "PS", "NS", "GE", "GP", "GL", "CE", "CO", "NC")


def row(name: str, scores: list, times: list[float], steps: list[int]) -> str:  # type: ignore[type-arg]
    agg = aggregate(scores)
    cells = " ".join(f"{agg[c]:5.1f}" if agg[c] is not None else "    -" for c in COLUMNS)
    extra = f" {statistics.median(times):7.2f} {statistics.mean(steps):5.1f}" if times else ""
    return f"{name:<48} {len(scores):3d} {cells}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--offset", type=int, default=0, help="skip this many sampled cases (a fresh slice)")
    ap.add_argument("--variant", action="append", default=[], help="JSON hyperparameter overrides (repeatable)")
    ap.add_argument("--chat-tokens", type=int, default=48)
    ap.add_argument("--neighbours", type=int, default=2, help="neighbour prompts for GL (the first also asked in chat)")
    ap.add_argument("--base-cache", type=Path, default=None, help="pickle of the unedited scores (read if present)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0, help="only the first LIMIT of the sampled cases (0: all)")
    args = ap.parse_args()
    variants = [json.loads(v) for v in args.variant] or [{}]
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    cases = sample_cases(load_cases(DATA)[0], args.n + args.offset, args.seed)[args.offset :]
    limit = args.limit or len(cases)
    editor.context_templates()
    editor.cov(editor.hparams.layer)
    gen = GenSettings(chat=ChatSettings(max_new_tokens=args.chat_tokens), max_neighbours=args.neighbours, chat_neighbours=1)
    fluency = GenerationSettings(max_new_tokens=0)
    if args.base_cache is not None and args.base_cache.is_file():
        base = pickle.loads(args.base_cache.read_bytes())
    else:
        base = [score_case(model, tok, c, fluency, 0, gen=gen) for c in cases]
        if args.base_cache is not None:
            args.base_cache.write_bytes(pickle.dumps(base))
    cases, base = cases[:limit], base[:limit]
    print(f"{'variant':<48}   n " + " ".join(f"{c:>5}" for c in COLUMNS) + " median_s steps", flush=True)
    print(row("unedited", base, [], []), flush=True)
    dump: dict = {"cases": [c.case_id for c in cases], "unedited": [s.gen.__dict__ for s in base], "variants": {}}
    for overrides in variants:
        scores, times, steps, said = [], [], [], []
        for case, before in zip(cases, base):
            done = timed_edit(editor, case, case.request(), **overrides)
            if done is None:
                continue
            edit, seconds = done
            times.append(seconds)
            steps.append(edit.stats["steps"])
            try:
                scores.append(score_case(model, tok, case, fluency, 0, gen=gen, gen_reference=before.gen))
            finally:
                editor.revert(edit)
            g = scores[-1].gen
            said.append({"case": case.case_id, "target_new": case.target_new, "target_true": case.target_true,
                         "question": g.question, "reply": g.reply, "completion": g.completion, **g.as_dict()})
        print(row(json.dumps(overrides), scores, times, steps), flush=True)
        dump["variants"][json.dumps(overrides)] = said
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=1, default=str))


if __name__ == "__main__":
    main()
