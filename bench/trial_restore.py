"""What it costs a layered edit to take its trial shares back, against the number of edits applied.

    python bench/trial_restore.py --n 100 500 1000

``compute_batch`` adds each layer's shares to the live weights (the next layer's keys must see
them) and takes them back before it returns. It used to do that with ``editor.rebuild``: every
batch layer rebuilt from its baseline through every applied edit, so the cost grew with the ledger.
It now uses ``editor.trial``, which restores copies of the batch layers taken on entry. For N
synthetic edits already applied over layers 5–9 of the default model, this prints both ways'
seconds for one batch of one fact (five shares) and their ratio, in the same process, and checks
that both leave the same weights bit for bit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import synthetic  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402

LAYERS = [5, 6, 7, 8, 9]


def one_batch(editor: RomeEditor, first: int) -> None:
    for j in range(len(LAYERS)):
        editor.apply(synthetic(editor, first + j, LAYERS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 500, 1000], help="edits applied before the batch")
    ap.add_argument("--repeats", type=int, default=3, help="timings per way; the median is printed")
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok)
    names = [editor.param_name(layer) for layer in LAYERS]
    print("applied edits | rebuild s | trial s | ratio")
    for n in args.n:
        applied = [synthetic(editor, i, LAYERS) for i in range(n * len(LAYERS))]  # n facts, one share per layer each
        editor.rebuild(applied)
        times: dict[str, list[float]] = {"rebuild": [], "trial": []}
        states = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            saved = list(editor.applied)
            one_batch(editor, len(applied))
            editor.rebuild(saved)
            times["rebuild"].append(time.perf_counter() - t0)
            states["rebuild"] = {k: model.get_parameter(k).detach().clone() for k in names}
            t0 = time.perf_counter()
            with editor.trial(names):
                one_batch(editor, len(applied))
            times["trial"].append(time.perf_counter() - t0)
            states["trial"] = {k: model.get_parameter(k).detach().clone() for k in names}
        same = all(torch.equal(states["rebuild"][k], states["trial"][k]) for k in names)
        rebuild, trial = (sorted(times[w])[len(times[w]) // 2] for w in ("rebuild", "trial"))
        print(f"{n:13d} | {rebuild:9.3f} | {trial:7.3f} | {rebuild / trial:5.1f}x{'' if same else '  (weights differ!)'}")
        editor.reset()


if __name__ == "__main__":
    main()
