"""Evaluate ROME against the unedited model and FT-L on CounterFact or zsRE, as in the paper's tables.

*Independent* mode edits each case alone and undoes it before the next (the paper's table).
*Sequential* mode applies every edit on top of the previous ones, measures the cases edited so
far at checkpoints (the collapse curve) and records each update's norm.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import mlp_out_param_name
from editing.evaluation.datasets import Case, load_cases, sample_cases
from editing.editor import RomeEditor
from editing.fingerprint import tensor_checksum
from editing.evaluation.ftl import FineTuneL, FTLHyperParams
from editing.evaluation.chat_metrics import GEN_METRICS, GenSettings
from editing.generation import ChatSettings
from editing.projection import UPDATES
from editing.evaluation.metrics import METRICS, CaseScores, GenerationSettings, aggregate, score_case

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]  # (stage, fraction done), as elsewhere in editing
MODES = ("independent", "sequential")
UNEDITED = "unedited"
EDIT_ERRORS = (ValueError, FloatingPointError)  # a case that cannot be edited is reported, not fatal


class Method(Protocol):
    """An editing method under test: ``apply`` edits in place (returns the update's norm); ``restore`` undoes all."""

    name: str

    def apply(self, case: Case) -> float: ...

    def restore(self) -> None: ...


class RomeMethod:
    """ROME with the update ``update`` names: "r-rome" (row "ROME") or "alphaedit" (row "AlphaEdit")."""

    def __init__(self, editor: RomeEditor, layer: int, overrides: dict[str, Any] | None = None,
                 update: str = "r-rome") -> None:  # fmt: skip
        self.editor, self.layer, self.overrides, self.update = editor, layer, dict(overrides or {}), update
        self.name = "ROME" if update == "r-rome" else "AlphaEdit"

    def apply(self, case: Case) -> float:
        edit = self.editor.compute(case.request(), **{**self.overrides, "layer": self.layer, "update": self.update})
        self.editor.apply(edit)
        return edit.update_norm

    def restore(self) -> None:
        self.editor.reset()  # run_evaluation starts from an editor with nothing applied


@dataclass(frozen=True)
class CaseResult:
    case: Case
    scores: dict[str, CaseScores]  # row name -> scores
    update_norms: dict[str, float]  # method name -> ||ΔW|| of this case's edit


@dataclass(frozen=True)
class EvalResult:
    """Per-case scores and the paper-style aggregate rows (``rows[name][metric]``, see ``METRICS``)."""

    mode: str
    n: int
    seed: int
    layer: int
    cases: tuple[CaseResult, ...]
    rows: dict[str, dict[str, float | None]]
    update_norms: dict[str, tuple[float, ...]] = field(default_factory=dict)  # method -> per edit, in order
    curves: dict[str, tuple[tuple[int, dict[str, float | None]], ...]] = field(default_factory=dict)
    failed: tuple[tuple[str, str], ...] = ()  # (case id, reason)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        cases = [
            {"case_id": r.case.case_id, "subject": r.case.subject, "prompt": r.case.prompt,
             "target_new": r.case.target_new, "target_true": r.case.target_true,
             "scores": {name: s.as_dict() for name, s in r.scores.items()}, "update_norm": r.update_norms,
             "said": {name: _said(s) for name, s in r.scores.items() if s.gen is not None}}
            for r in self.cases
        ]  # fmt: skip
        curves = {m: [{"edits": k, **row} for k, row in points] for m, points in self.curves.items()}
        return {
            "mode": self.mode, "n": self.n, "seed": self.seed, "layer": self.layer, "config": self.config,
            "aggregates": self.rows, "cases": cases, "update_norms": {k: list(v) for k, v in self.update_norms.items()},
            "curves": curves, "failed": [list(f) for f in self.failed], "seconds": round(self.seconds, 2),
        }  # fmt: skip


def _said(scores: CaseScores) -> dict[str, Any]:
    gen = scores.gen
    assert gen is not None
    return {"question": gen.question, "reply": gen.reply, "completion": gen.completion,
            "neighbour_completions": list(gen.neighbour_completions), **gen.texts}  # fmt: skip


@dataclass
class _Run:
    """Shared state of one evaluation run."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    cases: list[Case]
    seed: int
    generation: GenerationSettings
    progress: Progress | None
    total: int
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    said: GenSettings | None = None

    def score(self, index: int, reference: CaseScores | None = None) -> CaseScores:
        ref = None if reference is None else reference.reference
        gen_ref = None if reference is None else reference.gen
        case = self.cases[index]
        return score_case(self.model, self.tok, case, self.generation, self.seed + index, ref, self.said, gen_ref)

    def tick(self, units: int = 1) -> None:
        self.done += units
        if self.progress is not None:
            self.progress("evaluate", min(1.0, self.done / max(1, self.total)))

    def fail(self, index: int, method: str, err: Exception) -> None:
        log.warning("case %s (%s) failed: %s", self.cases[index].case_id, method, err)
        self.failed.append((str(self.cases[index].case_id), f"{method}: {err}"))


def _independent(run: _Run, methods: Sequence[Method]) -> tuple[list[CaseResult], dict[str, list[float]]]:
    results: list[CaseResult] = []
    for i, case in enumerate(run.cases):
        try:
            base = run.score(i)
        except EDIT_ERRORS as err:
            run.fail(i, UNEDITED, err)
            run.tick()
            continue
        scores, norms = {UNEDITED: base}, {}
        for method in methods:
            try:
                norms[method.name] = method.apply(case)
                scores[method.name] = run.score(i, base)
            except EDIT_ERRORS as err:
                run.fail(i, method.name, err)
                break
            finally:
                method.restore()
        else:
            results.append(CaseResult(case, scores, norms))
        run.tick()
    return results, {m.name: [r.update_norms[m.name] for r in results] for m in methods}


def _checkpoints(n: int, count: int) -> set[int]:
    step = max(1, n // max(1, count))
    return {k for k in range(step, n + 1, step)} | {n}


def _sequential_method(
    run: _Run, method: Method, base: dict[int, CaseScores], marks: set[int]
) -> tuple[dict[int, CaseScores], dict[int, float], list[tuple[int, dict[str, float | None]]]]:
    norms: dict[int, float] = {}
    curve: list[tuple[int, dict[str, float | None]]] = []
    latest: dict[int, CaseScores] = {}
    try:
        for k, i in enumerate(sorted(base), start=1):
            try:
                norms[i] = method.apply(run.cases[i])
            except EDIT_ERRORS as err:
                run.fail(i, method.name, err)
            run.tick()
            if k in marks:
                latest = {j: run.score(j, base[j]) for j in norms}
                curve.append((len(norms), aggregate(list(latest.values()))))
                run.tick(len(norms))
    finally:
        method.restore()
    return latest, norms, curve


def _sequential(run: _Run, methods: Sequence[Method], checkpoints: int) -> tuple[list[CaseResult], dict, dict]:
    base = {}
    for i in range(len(run.cases)):
        try:
            base[i] = run.score(i)
        except EDIT_ERRORS as err:
            run.fail(i, UNEDITED, err)
        run.tick()
    marks = _checkpoints(len(base), checkpoints)
    finals, norms, curves, order = {}, {}, {}, sorted(base)
    for method in methods:
        finals[method.name], norms[method.name], curves[method.name] = _sequential_method(run, method, base, marks)
    kept = [i for i in order if all(i in finals[m.name] for m in methods)]
    results = [
        CaseResult(run.cases[i], {UNEDITED: base[i], **{m.name: finals[m.name][i] for m in methods}},
                   {m.name: norms[m.name][i] for m in methods})
        for i in kept
    ]  # fmt: skip
    return results, {m: [norms[m][i] for i in order if i in norms[m]] for m in norms}, curves


def run_evaluation(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    editor: RomeEditor,
    cases: Sequence[Case],
    mode: str = "independent",
    n: int | None = 20,
    seed: int = 0,
    layer: int | None = None,
    progress: Progress | None = None,
    *,
    ftl: FTLHyperParams | bool = True,
    generation: GenerationSettings = GenerationSettings(),
    checkpoints: int = 10,
    said: GenSettings | None = None,
    rome_overrides: dict[str, Any] | None = None,
    updates: Sequence[str] = ("r-rome",),
) -> EvalResult:
    """Score the unedited model, FT-L (unless ``ftl`` is false) and ROME on a seeded sample of ``n`` cases.

    ``said`` switches on the generation metrics (GE/GP/GL/CE/CO/NC, ``editing.evaluation.chat_metrics``);
    ``rome_overrides`` are hyperparameters for ROME's edits (e.g. ``{"stop_on": "worst"}``).

    The editor must have no edits applied; the model's weights are unchanged on return.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if editor.applied:
        raise ValueError(f"the model carries {len(editor.applied)} applied edits; revert them before evaluating")
    layer = editor.hparams.layer if layer is None else layer
    if not 0 <= layer < editor.n_layers:
        raise ValueError(f"layer {layer} is out of range; this model has layers 0 to {editor.n_layers - 1}")
    sample = sample_cases(cases, n, seed)
    editor.cov(layer, progress=progress)  # the slow first-time statistics, before the timed loop
    editor.context_templates()
    ftl_hp = ftl if isinstance(ftl, FTLHyperParams) else FTLHyperParams(layer) if ftl else None
    methods: list[Method] = [] if ftl_hp is None else [FineTuneL(model, tok, ftl_hp)]
    if rome_overrides:
        editor.hparams.replace(**rome_overrides)  # unknown or bad values fail here, before the run
    methods.extend(RomeMethod(editor, layer, rome_overrides, update) for update in updates)
    m = len(sample)
    total = m if mode == "independent" else m + len(methods) * (m + sum(_checkpoints(m, checkpoints)))
    run = _Run(model, tok, sample, seed, generation, progress, total, said=said)
    run.tick(0)  # starts the clock of a progress bar
    checksum = tensor_checksum(model.get_parameter(mlp_out_param_name(model, layer)))
    start = time.perf_counter()
    if mode == "independent":
        results, norms = _independent(run, methods)
        curves: dict = {}
    else:
        results, norms, curves = _sequential(run, methods, checkpoints)
    if tensor_checksum(model.get_parameter(mlp_out_param_name(model, layer))) != checksum:
        raise RuntimeError("the evaluation did not restore the model's weights")
    names = [UNEDITED, *(m.name for m in methods)]
    config = {"generation": asdict(generation), "ftl": None if ftl_hp is None else ftl_hp.to_dict(),
              "said": None if said is None else asdict(said), "rome_overrides": dict(rome_overrides or {}),
              "hparams": editor.hparams.to_dict(), "updates": list(updates)}  # fmt: skip
    return EvalResult(
        mode=mode, n=len(sample), seed=seed, layer=layer, cases=tuple(results),
        rows={name: aggregate([r.scores[name] for r in results]) for name in names},
        update_norms={k: tuple(v) for k, v in norms.items()},
        curves={k: tuple(v) for k, v in curves.items()}, failed=tuple(run.failed), config=config,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


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
    parser.add_argument("--mode", choices=MODES, default="independent")
    parser.add_argument("--json", type=Path, default=None, help="write every per-case number here")
    parser.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2)")
    parser.add_argument("--no-ftl", action="store_true", help="leave out the FT-L baseline")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the sequential curves")
    parser.add_argument("--gen-tokens", type=int, default=64, help="tokens generated for fluency (0: off)")
    parser.add_argument("--checkpoints", type=int, default=10, help="sequential measurements along the way")
    parser.add_argument("--chat-tokens", type=int, default=64,
                        help="reply length of the chat metrics CE/CO/NC, with the app's chat settings (0: no generation metrics)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a ROME hyperparameter for the edits, e.g. --set stop_on=worst (repeatable)")
    parser.add_argument("--update", nargs="+", choices=UPDATES, default=["r-rome"],
                        help="update rule(s), compared side by side (default r-rome)")
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
        model, tok = load_model(args.model)
        editor = RomeEditor(model, tok)
        if args.null_space_threshold is not None:
            editor.hparams = editor.hparams.replace(null_space_threshold=args.null_space_threshold)
        with logging_redirect_tqdm():
            result = run_evaluation(
                model, tok, editor, cases, args.mode, args.n, args.seed, args.layer, progress,
                ftl=not args.no_ftl, generation=GenerationSettings(max_new_tokens=args.gen_tokens),
                checkpoints=args.checkpoints, rome_overrides=_overrides(args.set), updates=args.update,
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
