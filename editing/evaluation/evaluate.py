"""Evaluate ROME against the unedited model and FT-L on CounterFact or zsRE, as in the paper's tables.

*Independent* mode edits each case alone and undoes it before the next (the paper's table).
*Sequential* mode applies every edit on top of the previous ones, measures the cases edited so
far at checkpoints (the collapse curve) and records each update's norm. *Batch* mode edits the cases
together with MEMIT, in batches (``editing.evaluation.batch``), and scores them after the last batch.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import mlp_out_param_name
from editing.defaults import LAYERED
from editing.evaluation.datasets import Case, sample_cases
from editing.editor import RomeEditor
from editing.fingerprint import tensor_checksum
from editing.evaluation.batch import METHOD as BATCH_METHOD
from editing.evaluation.batch import check_size, fact_norm, run_batches
from editing.evaluation.ftl import FineTuneL, FTLHyperParams
from editing.evaluation.chat_metrics import GenSettings
from editing.evaluation.metrics import CaseScores, GenerationSettings, aggregate, score_case

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]  # (stage, fraction done), as elsewhere in editing
MODES = ("independent", "sequential", "batch")
UNEDITED = "unedited"
EDIT_ERRORS = (ValueError, FloatingPointError)  # a case that cannot be edited is reported, not fatal


class Method(Protocol):
    """An editing method under test: ``apply`` edits in place (returns the update's norm); ``restore`` undoes all."""

    name: str

    def apply(self, case: Case) -> float: ...

    def restore(self) -> None: ...


ROW_NAMES = {"r-rome": "ROME", "alphaedit": "AlphaEdit", "memit": "MEMIT-1", "alphaedit-layers": "AlphaEdit-1"}


class RomeMethod:
    """One edit per case with the update ``update`` names: "r-rome" (row "ROME"), "alphaedit" (row
    "AlphaEdit"), "memit" (row "MEMIT-1": a batch of one fact over ``batch_layers``, ending at ``layer``)
    or "alphaedit-layers" (row "AlphaEdit-1": the same with AlphaEdit's projected solve at each layer)."""

    def __init__(self, editor: RomeEditor, layer: int, overrides: dict[str, Any] | None = None,
                 update: str = "r-rome") -> None:  # fmt: skip
        self.editor, self.layer, self.overrides, self.update = editor, layer, dict(overrides or {}), update
        self.name = ROW_NAMES[update]

    def apply(self, case: Case) -> float:
        if self.update in LAYERED:
            batch = self.editor.compute_batch([case.request()], **{**self.overrides, "layer": self.layer,
                                                                   "update": LAYERED[self.update]})  # fmt: skip
            self.editor.apply(batch)
            return fact_norm(batch.edits)
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
    run: _Run, method: Method, order: Sequence[int], base: dict[int, CaseScores], marks: set[int]
) -> tuple[dict[int, CaseScores], dict[int, float], list[tuple[int, dict[str, float | None]]]]:
    """Edit the cases ``order`` one after another; at each mark, score the edited cases that ``base`` holds."""
    norms: dict[int, float] = {}
    curve: list[tuple[int, dict[str, float | None]]] = []
    latest: dict[int, CaseScores] = {}
    try:
        for k, i in enumerate(order, start=1):
            try:
                norms[i] = method.apply(run.cases[i])
            except EDIT_ERRORS as err:
                run.fail(i, method.name, err)
            run.tick()
            if k in marks:
                latest = {j: run.score(j, base[j]) for j in norms if j in base}
                curve.append((len(norms), aggregate(list(latest.values()))))
                run.tick(len(latest))
                log.info("%s after %d edits (%d scored): %s; unedited on these cases %s; mean ||ΔW|| %.1f",
                         method.name, len(norms), len(latest), _headline(curve[-1][1]),
                         _headline(aggregate([base[j] for j in latest])), sum(norms.values()) / max(1, len(norms)))  # fmt: skip
    finally:
        method.restore()
    return latest, norms, curve


def _headline(row: dict[str, float | None]) -> dict[str, float]:
    """ES, PS and NS of an aggregated row, rounded for the log."""
    return {k: round(v, 1) for k, v in row.items() if k in ("ES", "PS", "NS") and v is not None}


def watched_cases(n: int, watch: int | None, seed: int) -> list[int]:
    """The indices of the ``watch`` cases (a seeded sample of ``range(n)``, ascending) sequential checkpoints score; all without ``watch``."""
    if watch is None or watch >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), watch))


def _sequential(
    run: _Run, methods: Sequence[Method], checkpoints: int, watch: int | None = None
) -> tuple[list[CaseResult], dict, dict]:
    base = {}
    for i in watched_cases(len(run.cases), watch, run.seed):
        try:
            base[i] = run.score(i)
        except EDIT_ERRORS as err:
            run.fail(i, UNEDITED, err)
        run.tick()
    # Without ``watch`` a case whose unedited scoring failed is not edited; with it every case is.
    order = sorted(base) if watch is None else list(range(len(run.cases)))
    marks = _checkpoints(len(order), checkpoints)
    finals, norms, curves = {}, {}, {}
    for method in methods:
        finals[method.name], norms[method.name], curves[method.name] = _sequential_method(run, method, order, base, marks)
    kept = [i for i in sorted(base) if all(i in finals[m.name] for m in methods)]
    results = [
        CaseResult(run.cases[i], {UNEDITED: base[i], **{m.name: finals[m.name][i] for m in methods}},
                   {m.name: norms[m.name][i] for m in methods})
        for i in kept
    ]  # fmt: skip
    return results, {m: [norms[m][i] for i in order if i in norms[m]] for m in norms}, curves


def _batch(run: _Run, editor: RomeEditor, layer: int, overrides: dict[str, Any], size: int | None) -> tuple:
    out = run_batches(run, editor, size, {**overrides, "layer": layer})
    results = [CaseResult(run.cases[i], {UNEDITED: out.base[i], BATCH_METHOD: out.edited[i]},
                          {BATCH_METHOD: out.norms[i]}) for i in sorted(out.edited)]  # fmt: skip
    return results, {BATCH_METHOD: [out.norms[i] for i in sorted(out.edited)]}, out.summary(size)


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
    batch_size: int | None = None,
    watch: int | None = None,
) -> EvalResult:
    """Score the unedited model, FT-L (unless ``ftl`` is false) and ROME on a seeded sample of ``n`` cases.

    ``said`` switches on the generation metrics (GE/GP/GL/CE/CO/NC, ``editing.evaluation.chat_metrics``);
    ``rome_overrides`` are hyperparameters for ROME's edits (e.g. ``{"stop_on": "worst"}``). Batch mode
    (MEMIT, no FT-L) takes its layers from ``rome_overrides["batch_layers"]`` (default: the 5 ending at
    ``layer``) and edits ``batch_size`` cases at a time (default: all). In sequential mode ``watch``
    scores only that many of the cases (a seeded sample) at each checkpoint, while every case is edited:
    the scores estimate the full ones at a fraction of the time.

    The editor must have no edits applied; the model's weights are unchanged on return.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if editor.applied:
        raise ValueError(f"the model carries {len(editor.applied)} applied edits; revert them before evaluating")
    layer = editor.hparams.layer if layer is None else layer
    if not 0 <= layer < editor.n_layers:
        raise ValueError(f"layer {layer} is out of range; this model has layers 0 to {editor.n_layers - 1}")
    check_size(batch_size)
    if watch is not None and (mode != "sequential" or watch < 1):
        raise ValueError("watch belongs to the sequential mode and must be at least 1")
    sample = sample_cases(cases, n, seed)
    editor.cov(layer, progress=progress)  # the slow first-time statistics, before the timed loop
    editor.context_templates()
    ftl_hp = ftl if isinstance(ftl, FTLHyperParams) else FTLHyperParams(layer) if ftl else None
    methods: list[Method] = [] if ftl_hp is None else [FineTuneL(model, tok, ftl_hp)]
    if rome_overrides:
        editor.hparams.replace(**rome_overrides)  # unknown or bad values fail here, before the run
    methods.extend(RomeMethod(editor, layer, rome_overrides, update) for update in updates)
    if mode == "batch":
        if ftl_hp is not None:
            log.info("batch mode compares MEMIT with the unedited model; FT-L is not run")
        methods, ftl_hp = [], None
    m = len(sample)
    w = min(m, watch or m)  # cases scored at each sequential checkpoint, about k·w/m of them after k edits
    total = {"independent": m, "batch": 3 * m}.get(mode, w + len(methods) * (m + sum(k * w // m for k in _checkpoints(m, checkpoints))))
    run = _Run(model, tok, sample, seed, generation, progress, total, said=said)
    run.tick(0)  # starts the clock of a progress bar
    checksum = tensor_checksum(model.get_parameter(mlp_out_param_name(model, layer)))
    start = time.perf_counter()
    curves: dict = {}
    batch_info: dict[str, Any] = {}
    if mode == "independent":
        results, norms = _independent(run, methods)
    elif mode == "batch":
        results, norms, batch_info = _batch(run, editor, layer, rome_overrides or {}, batch_size)
    else:
        results, norms, curves = _sequential(run, methods, checkpoints, watch)
    if tensor_checksum(model.get_parameter(mlp_out_param_name(model, layer))) != checksum:
        raise RuntimeError("the evaluation did not restore the model's weights")
    names = [UNEDITED, *(m.name for m in methods), *([BATCH_METHOD] if mode == "batch" else [])]
    config = {"generation": asdict(generation), "ftl": None if ftl_hp is None else ftl_hp.to_dict(),
              "said": None if said is None else asdict(said), "rome_overrides": dict(rome_overrides or {}),
              "hparams": editor.hparams.to_dict(), "updates": list(updates), "watch": watch,
              **({"batch": batch_info} if mode == "batch" else {})}  # fmt: skip
    return EvalResult(
        mode=mode, n=len(sample), seed=seed, layer=layer, cases=tuple(results),
        rows={name: aggregate([r.scores[name] for r in results]) for name in names},
        update_norms={k: tuple(v) for k, v in norms.items()},
        curves={k: tuple(v) for k, v in curves.items()}, failed=tuple(run.failed), config=config,
        seconds=time.perf_counter() - start,
    )  # fmt: skip
