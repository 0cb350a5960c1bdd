"""Sweep ROME settings on CounterFact development cases: quality (ES/PS/NS) and edit time per setting.

    python bench/sweep.py --n 20 --layers 3 6 9 12 --samples 2000 --value-templates 21 11 --lr 0.5
    python bench/sweep.py --n 24 --seed 1 --layers 9 --samples 1000 --value-templates 11 --lr 2 --chat
    python bench/sweep.py --n 24 --seed 1 --value-templates 11 --lr 2 --samples 1000 \
        --kl-direction "original||edited" "edited||original" --norm-power 1 2 --early-stop-on nll loss

Prints one row per setting; used to choose the default layer, statistics sample count,
number of value templates, learning rate, early stop and the value loss's variant (see README, "How the defaults were chosen").
``--chat`` also asks the edited model, through its chat template and greedily, about each case
("Tell me about {subject}." and the case's prompt) and reports how repetitive the replies are
(share of repeated word trigrams, and the share of replies over 0.3: loops) and how often the
reply to the prompt names the new object.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_app.probes import stream_chat  # noqa: E402
from editing import RomeEditor, load_model  # noqa: E402
from editing.evaluation.datasets import load_cases, sample_cases  # noqa: E402
from editing.evaluation.metrics import object_probs, repetition  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact_dev.json"


def scores(model, tok, case) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    rewrites = [case.prompt, *case.paraphrases]
    prompts = [p for p in rewrites for _ in range(2)] + [p for p in case.neighbourhood for _ in range(2)]
    objects = [case.target_new, case.target_true] * len(rewrites)
    objects += [case.neighbourhood_answer, case.target_new] * len(case.neighbourhood)
    probs = object_probs(model, tok, prompts, objects)
    wins = [float(probs[i] > probs[i + 1]) for i in range(0, len(probs), 2)]
    n = len(rewrites)
    return wins[0], statistics.mean(wins[1:n]) if n > 1 else float("nan"), statistics.mean(wins[n:]) if wins[n:] else float("nan")


LOOP = 0.3  # a reply with more than this share of repeated trigrams reads as a loop


def chat_reply(model, tok, question: str, penalty: float, max_new_tokens: int = 48) -> str:  # type: ignore[no-untyped-def]
    """The app's greedy chat reply (``chat_app.probes.stream_chat``) to a single-turn question."""
    reply = ""
    for reply in stream_chat(model, tok, [{"role": "user", "content": question}], 0.0, max_new_tokens,
                             repetition_penalty=penalty):  # fmt: skip
        pass
    return reply


def chat_check(model, tok, case, penalty: float = 1.0) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """(mean repetition, share of loops, 1 if the reply to the prompt names the new object) for one case."""
    about, answer = (chat_reply(model, tok, q, penalty) for q in (f"Tell me about {case.subject}.", case.prompt))
    reps = [repetition(about), repetition(answer)]
    return statistics.mean(reps), statistics.mean(float(r > LOOP) for r in reps), float(
        case.target_new.lower() in answer.lower()
    )


def timed_edit(editor: RomeEditor, case, request, **overrides):  # type: ignore[no-untyped-def]
    """Compute and apply ``request``'s edit; ``(edit, seconds)``, or None (printed) when the case is refused."""
    t0 = time.perf_counter()
    try:
        edit = editor.compute(request, **overrides)
    except ValueError as err:
        print(f"  skipped case {case.case_id}: {err}", flush=True)
        return None
    editor.apply(edit)
    return edit, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, nargs="+", default=[9])
    ap.add_argument("--samples", type=int, nargs="+", default=[2000])
    ap.add_argument("--value-templates", type=int, nargs="+", default=[21])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.5])
    ap.add_argument("--early-stop", type=float, nargs="+", default=[0.05], help="early_stop_loss values")
    ap.add_argument("--kl-direction", nargs="+", default=["original||edited"], choices=["original||edited", "edited||original"])
    ap.add_argument("--norm-power", type=int, nargs="+", default=[1], choices=[1, 2], help="norm penalty ||d||/||v0||^p")
    ap.add_argument("--early-stop-on", nargs="+", default=["nll"], choices=["nll", "loss"])
    ap.add_argument("--chat", action="store_true", help="also check the edited model's chat replies")
    ap.add_argument("--chat-penalty", type=float, default=1.0, help="repetition penalty of those chat replies")
    ap.add_argument("--method", default="fast")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    model, tok = load_model()
    editor = RomeEditor(model, tok, method=args.method)
    cases = sample_cases(load_cases(DATA)[0], args.n, args.seed)
    base = [scores(model, tok, c) for c in cases]
    print(f"unedited: ES {100 * statistics.mean(s[0] for s in base):.1f} NS {100 * statistics.mean(s[2] for s in base):.1f}", flush=True)
    if args.chat:
        chat0 = [chat_check(model, tok, c, args.chat_penalty) for c in cases]
        print(f"unedited chat (repetition penalty {args.chat_penalty}): repetition {statistics.mean(c[0] for c in chat0):.3f} "
              f"loops {100 * statistics.mean(c[1] for c in chat0):.1f}% names new {100 * statistics.mean(c[2] for c in chat0):.1f}%",
              flush=True)  # fmt: skip
    print("layer samples vtempl lr   stop  kl               pow on     ES    PS    NS   median_s mean_steps"
          + ("   rep loops% names%" if args.chat else ""), flush=True)  # fmt: skip
    grid = itertools.product(args.layers, args.samples, args.value_templates, args.lr, args.early_stop,
                             args.kl_direction, args.norm_power, args.early_stop_on)  # fmt: skip
    for layer, n_samples, vt, lr, stop, kl, power, stop_on in grid:
        editor.cov(layer, n_samples)  # statistics outside the timing
        rows, times, steps, chats = [], [], [], []
        for case in cases:
            done = timed_edit(editor, case, case.request(layer), stats_samples=n_samples, value_templates=vt, lr=lr,
                              early_stop_loss=stop, kl_direction=kl, norm_power=power, early_stop_on=stop_on)
            if done is None:
                continue
            edit, seconds = done
            times.append(seconds)
            steps.append(edit.stats["steps"])
            rows.append(scores(model, tok, case))
            if args.chat:
                chats.append(chat_check(model, tok, case, args.chat_penalty))
            editor.revert(edit)
            if args.verbose:
                print(f"  case {case.case_id}: steps {steps[-1]} time {times[-1]:.1f}s ES/PS/NS {rows[-1]}", flush=True)
        mean = lambda i: 100 * statistics.mean(r[i] for r in rows)  # noqa: E731
        chat = (f" {statistics.mean(c[0] for c in chats):5.3f} {100 * statistics.mean(c[1] for c in chats):6.1f} "
                f"{100 * statistics.mean(c[2] for c in chats):6.1f}") if chats else ""  # fmt: skip
        print(f"{layer:5d} {n_samples:7d} {vt:6d} {lr:4.2f} {stop:5.2f} {kl:16s} {power:3d} {stop_on:4s} {mean(0):5.1f} {mean(1):5.1f} {mean(2):5.1f} "
              f"{statistics.median(times):8.2f} {statistics.mean(steps):6.1f}{chat}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
