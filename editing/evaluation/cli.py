"""``python app.py evaluate``: run an evaluation from the command line, print its table, write JSON and a plot."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editing.defaults import DEVICE_MAPS, LAYERED
from editing.editor import RomeEditor
from editing.evaluation.chat_metrics import GEN_METRICS, GenSettings
from editing.evaluation.datasets import load_cases
from editing.evaluation.evaluate import MODES, EvalResult, run_evaluation
from editing.evaluation.metrics import METRICS, GenerationSettings
from editing.generation import ChatSettings
from editing.projection import UPDATES

log = logging.getLogger(__name__)


def format_table(result: EvalResult) -> str:
    """The paper's table: one row per method, success rates and magnitudes in %, fluency in bits."""
    shown = [m for m in METRICS if m not in GEN_METRICS or any(row[m] is not None for row in result.rows.values())]
    head = f"{'':<10}" + "".join(f"{m:>9}" for m in shown)
    lines = [head, "-" * len(head)]
    for name, row in result.rows.items():
        cells = "".join(f"{'-':>9}" if row[m] is None else f"{row[m]:>9.2f}" for m in shown)
        lines.append(f"{name:<10}{cells}")
    for method, norms in result.update_norms.items():
        if norms:
            lines.append(f"{method} ||ΔW||: mean {sum(norms) / len(norms):.3g}, max {max(norms):.3g}")
    batch = result.config.get("batch")
    if batch and batch.get("seconds_per_fact") is not None:
        lines.append(f"MEMIT: {sum(batch['batches'])} facts in {len(batch['batches'])} batch(es) at layers {batch['layers']}, "
                     f"{batch['seconds_per_fact']:.2f} s per fact (compute_batch; key statistics excluded)")  # fmt: skip
    lines.append(
        f"{len(result.cases)} of {result.n} cases, mode {result.mode}, layer {result.layer}, seed {result.seed}, "
        f"{len(result.failed)} failed, {result.seconds:.1f} s"
    )
    return "\n".join(lines)


def plot_curves(result: EvalResult, path: Path) -> None:
    """Efficacy, neighbourhood score and fluency against the number of edits, and each update's norm."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4), layout="constrained")
    scores, flu, norms = fig.subplots(1, 3)
    for k, (method, points) in enumerate(result.curves.items()):
        edits, color = [n for n, _ in points], f"C{k}"
        scores.plot(edits, [r["ES"] for _, r in points], marker="o", color=color, label=f"{method} ES")
        scores.plot(edits, [r["NS"] for _, r in points], marker="s", ls="--", color=color, label=f"{method} NS")
        flu.plot(edits, [r["fluency"] for _, r in points], marker="o", color=color, label=method)
        values = result.update_norms.get(method, ())
        norms.plot(range(1, len(values) + 1), values, color=color, label=method)
    for ax, title, ylabel in (
        (scores, "success on the edited cases", "%"),
        (flu, "generation fluency", "n-gram entropy (bits)"),
        (norms, "norm of each update", "||ΔW||"),
    ):
        ax.set(title=title, xlabel="number of edits", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    norms.set_yscale("log")
    fig.savefig(path, dpi=120)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="CounterFact (original or flat) or zsRE JSON")
    parser.add_argument("--n", type=int, default=20, help="cases in the seeded random sample (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and generation seed")
    parser.add_argument("--layer", type=int, default=None, help="layer to edit (default: the model's)")
    parser.add_argument("--mode", choices=MODES, default="independent",
                        help="independent: one edit at a time; sequential: edits accumulate; batch: MEMIT batches")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="batch mode and --update memit: MEMIT's layers, ascending (default: the 5 ending at --layer)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch mode: facts per batch (default: all n)")
    parser.add_argument("--json", type=Path, default=None, help="write every per-case number here")
    parser.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2)")
    parser.add_argument("--device-map", choices=DEVICE_MAPS, help="spread the model over the devices with accelerate")
    parser.add_argument("--no-ftl", action="store_true", help="leave out the FT-L baseline")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the sequential curves")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens generated for fluency (0: off)")
    parser.add_argument("--checkpoints", type=int, default=10, help="sequential measurements along the way")
    parser.add_argument("--watch", type=int, default=None, metavar="K",
                        help="sequential mode: score a seeded sample of K cases at each checkpoint (every case is still edited)")
    parser.add_argument("--chat-tokens", type=int, default=64,
                        help="reply length of the chat metrics CE/CO/NC, with the app's chat settings (0: no generation metrics)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a ROME hyperparameter for the edits, e.g. --set stop_on=worst (repeatable)")
    parser.add_argument("--update", nargs="+", choices=(*UPDATES, *LAYERED), default=["r-rome"],
                        help="update rule(s), compared side by side (default r-rome); memit, alphaedit-layers: each "
                             "case a batch of one over --layers, by MEMIT's or AlphaEdit's solve")
    parser.add_argument("--null-space-threshold", type=float, default=None, help="alphaedit's eigenvalue threshold")
    return parser


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["lr=1", "stop_on=worst"]`` -> ``{"lr": 1, "stop_on": "worst"}`` (numbers and booleans parsed as JSON)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--set needs NAME=VALUE, got {pair!r}")
        try:
            out[name.strip()] = json.loads(text)
        except ValueError:
            out[name.strip()] = text
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``evaluate --data PATH [...]``: print the table; return the exit status."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from editing.loading import load_model

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bars: dict[str, tqdm] = {}

    def progress(stage: str, fraction: float) -> None:
        if stage not in bars:
            for old in bars.values():
                old.close()
            bars[stage] = tqdm(total=100, desc=stage, bar_format="{l_bar}{bar}| [{elapsed}<{remaining}]")
        bar = bars[stage]
        bar.update(round(100 * fraction, 1) - bar.n)  # update(), not n=, so tqdm estimates the time left

    try:
        cases, skipped = load_cases(args.data)
        if not cases:
            raise ValueError(f"{args.data} holds no usable case ({skipped.count} skipped)")
        overrides = _overrides(args.set)
        if args.mode != "batch" and args.batch_size:
            raise ValueError("--batch-size belongs to --mode batch")
        if args.layers and args.mode != "batch" and not set(LAYERED) & set(args.update):
            raise ValueError("--layers belongs to --mode batch, --update memit or alphaedit-layers")
        if args.layers:
            if args.layer is not None and args.layer != args.layers[-1]:
                raise ValueError("--layer must be the last of --layers: MEMIT optimises the values there")
            overrides["batch_layers"], args.layer = tuple(args.layers), args.layers[-1]
        model, tok = load_model(args.model, device_map=args.device_map)
        editor = RomeEditor(model, tok)
        if args.null_space_threshold is not None:
            editor.hparams = editor.hparams.replace(null_space_threshold=args.null_space_threshold)
        with logging_redirect_tqdm():
            result = run_evaluation(
                model, tok, editor, cases, args.mode, args.n, args.seed, args.layer, progress,
                ftl=not args.no_ftl, generation=GenerationSettings(max_new_tokens=args.gen_tokens),
                checkpoints=args.checkpoints, rome_overrides=overrides, updates=args.update,
                batch_size=args.batch_size, watch=args.watch,
                said=GenSettings(chat=ChatSettings(max_new_tokens=args.chat_tokens)) if args.chat_tokens > 0 else None,
            )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    print(format_table(result))  # the command's output, not a log line
    if args.json is not None:
        payload = {**result.to_dict(), "data": str(args.data), "skipped_records": skipped.count}
        args.json.write_text(json.dumps(payload, indent=1))
        log.info("wrote %s", args.json)
    if args.plot is not None:
        if result.mode == "sequential":
            plot_curves(result, args.plot)
            log.info("wrote %s", args.plot)
        else:
            log.warning("--plot draws the sequential curves; run with --mode sequential")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
