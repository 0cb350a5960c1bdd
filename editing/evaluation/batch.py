"""*Batch* mode: the sampled cases edited together with MEMIT (``editor.compute_batch``).

The cases are split, in sample order, into batches of ``size`` (default: one batch of all); each
batch is computed on the weights the previous ones left and applied, then every case is scored on
the final weights, against its unedited scores. The time reported per fact is ``compute_batch``'s
own (key statistics, computed once per layer and cached, left out).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from editing.editor import RomeEditor
from editing.evaluation.datasets import Case
from editing.evaluation.metrics import CaseScores

log = logging.getLogger(__name__)

METHOD = "MEMIT"
BATCH_ERRORS = (ValueError, FloatingPointError)  # a batch that cannot be edited fails its cases, not the run


class Scorer(Protocol):
    """What batch mode needs of an evaluation run (``editing.evaluation.evaluate._Run``)."""

    cases: list[Case]

    def score(self, index: int, reference: CaseScores | None = None) -> CaseScores: ...

    def tick(self, units: int = 1) -> None: ...

    def fail(self, index: int, method: str, err: Exception) -> None: ...


@dataclass
class BatchOutcome:
    """Per case index: unedited and edited scores, and the norm of its share of the update over all layers."""

    base: dict[int, CaseScores] = field(default_factory=dict)
    edited: dict[int, CaseScores] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0  # compute_batch time, all batches
    layers: tuple[int, ...] = ()
    sizes: list[int] = field(default_factory=list)
    mean_steps: list[float] = field(default_factory=list)  # per batch: mean value-optimisation steps

    def summary(self, size: int | None) -> dict[str, Any]:
        facts = sum(self.sizes)
        return {"batch_size": size, "batches": self.sizes, "layers": list(self.layers),
                "compute_s": round(self.seconds, 2),
                "seconds_per_fact": round(self.seconds / facts, 3) if facts else None,
                "mean_steps": [round(s, 2) for s in self.mean_steps]}  # fmt: skip


def fact_norm(shares: Sequence[Any]) -> float:
    """‖ΔW‖ of one fact over all its layers' shares (separate matrices, so the squares add)."""
    return math.sqrt(sum(s.update_norm**2 for s in shares))


def check_size(size: int | None) -> None:
    if size is not None and size < 1:
        raise ValueError(f"the batch size must be at least 1, got {size}")


def run_batches(
    run: Scorer, editor: RomeEditor, size: int | None, overrides: dict[str, Any]
) -> BatchOutcome:
    """Score every case unedited, edit them batch by batch, score them again; the editor is reset on return."""
    check_size(size)
    out = BatchOutcome()
    for i in range(len(run.cases)):
        try:
            out.base[i] = run.score(i)
        except BATCH_ERRORS as err:
            run.fail(i, "unedited", err)
        run.tick()
    order = sorted(out.base)
    step = size or max(1, len(order))
    try:
        for start in range(0, len(order), step):
            _one_batch(run, editor, order[start : start + step], overrides, out)
        for i in out.norms:
            out.edited[i] = run.score(i, out.base[i])
            run.tick()
    finally:
        editor.reset()  # run_evaluation starts from an editor with nothing applied
    return out


def _one_batch(run: Scorer, editor: RomeEditor, chunk: Sequence[int], overrides: dict[str, Any], out: BatchOutcome) -> None:
    try:
        batch = editor.compute_batch([run.cases[i].request() for i in chunk], **overrides)
    except BATCH_ERRORS as err:
        for i in chunk:
            run.fail(i, METHOD, err)
        run.tick(2 * len(chunk))  # neither edited nor scored
        return
    editor.apply(batch)
    out.seconds += float(batch.stats["seconds"])
    out.layers, out.sizes = tuple(batch.stats["layers"]), [*out.sizes, len(chunk)]
    out.mean_steps.append(float(batch.stats["mean_steps"]))
    for i, shares in zip(chunk, batch.facts):
        out.norms[i] = fact_norm(shares)
    run.tick(len(chunk))
    log.info("batch of %d facts at layers %s: %.1f s", len(chunk), list(out.layers), batch.stats["seconds"])
