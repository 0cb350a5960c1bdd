"""An edit's checks beyond its own prompt, answered in the background once it is applied.

The form shows an applied edit as soon as its own prompt's greedy answer is checked (the refusal
rule needs that answer); the paraphrases, neighbours and chat row it also checks are answered next,
in a background thread, on the weights as they were right after the edit (edits applied since are
hidden by a thread-local view), appended to the edit's ledger record, and collected with
``checks``. Their answers before the edit are remembered ones (the preview's), or answered there
too, on a view of the weights the edit was applied to.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from chat_app.completions import CompletionCache, State
from chat_app.locks import RWLock
from chat_app.results import Probe
from db import Ledger
from editing import RankOneEdit, RomeEditor

log = logging.getLogger(__name__)
KEEP_JOBS = 64  # finished jobs nobody collected are dropped beyond this many


@dataclasses.dataclass
class _Job:
    first: tuple[Probe, ...]  # the checks answered at apply time
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    probes: tuple[Probe, ...] = ()
    error: BaseException | None = None


def _with_before(probe: Probe, before: str) -> Probe:
    """A neighbour is expected to keep its answer before the edit."""
    return Probe.of(probe.prompt, probe.kind, probe.expected, before)


class LaterChecks:
    """Mixed into ``EditService``: the state it declares is set up by the service."""

    editor: RomeEditor
    ledger: Ledger
    weights: RWLock
    model: Any
    tok: Any
    _jobs: dict[int, _Job]
    completions: CompletionCache
    _answers: Callable[[Sequence[Probe]], list[str]]  # the service's: each probe's answer in this thread's view

    def _defer_checks(self, edit_id: int, edit: RankOneEdit, first: tuple[Probe, ...], pending: tuple[Probe, ...],
                      state: State) -> None:  # fmt: skip
        """Answer ``pending`` in a background thread; ``checks(edit_id)`` collects them.

        Their ``after`` is empty; a ``before`` of None is answered too, on the weights the edit was
        applied to (``state``, where answers are remembered).
        """
        for old in [i for i, job in self._jobs.items() if job.done.is_set()][: max(0, len(self._jobs) - KEEP_JOBS)]:
            del self._jobs[old]
        job = self._jobs[edit_id] = _Job(first)
        # Not a daemon: a process that exits meanwhile waits for these few seconds rather than killing a forward pass.
        threading.Thread(target=self._run_job, args=(edit_id, edit, pending, state, job), name=f"checks-{edit_id}").start()

    def _run_job(self, edit_id: int, edit: RankOneEdit, pending: tuple[Probe, ...], state: State, job: _Job) -> None:
        try:
            job.probes = job.first + self.answer_pending(edit_id, edit, pending, state)
        except BaseException as err:  # noqa: BLE001 - handed to whoever collects the checks
            log.exception("the checks of edit #%d failed", edit_id)
            job.error = err
        finally:
            job.done.set()

    def answer_pending(self, edit_id: int, edit: RankOneEdit, pending: tuple[Probe, ...],
                       state: State | None = None) -> tuple[Probe, ...]:  # fmt: skip
        """``pending`` answered on the weights right after ``edit`` and added to its ledger record.

        A ``before`` of None is answered on the weights right before it (the applied edits less
        ``edit`` and those applied since: the tensors ``revert`` would leave, bit for bit) and
        remembered under ``state``. Nothing is answered when ``edit`` is no longer applied.
        """
        with self.weights.read():
            applied = self.editor.applied
            at = next((i for i, e in enumerate(applied) if e is edit), None)
            if at is None:
                return ()
            later = list(applied[at + 1 :])
            unknown = [p for p in pending if p.before is None]
            if unknown:
                with self.editor.view(without=[edit, *later]):
                    befores = dict(zip(unknown, self._answers(unknown)))
                if state is not None:
                    for probe, text in befores.items():
                        self.completions.put(state, probe.prompt, text, "chat" if probe.kind == "chat" else "complete")
                pending = tuple(_with_before(p, befores[p]) if p in befores else p for p in pending)
            with self.editor.view(without=later):
                done = tuple(dataclasses.replace(p, after=a) for p, a in zip(pending, self._answers(pending)))
            if not later:
                self._remember(done)  # type: ignore[attr-defined]  # the live weights: the next preview reuses them
        self.ledger.add_probes(edit_id, [p.to_dict() for p in done])
        return done

    def checks(self, edit_id: int, timeout_s: float | None = None) -> tuple[Probe, ...]:
        """Every check of ``edit_id``, once its background checks are answered (from the ledger for older edits)."""
        job = self._jobs.get(edit_id)
        if job is not None:
            if not job.done.wait(timeout_s):
                raise TimeoutError(f"the checks of edit #{edit_id} are still running")
            if job.error is not None:
                raise RuntimeError(f"the checks of edit #{edit_id} failed: {job.error}") from job.error
            return job.probes
        record = self.ledger.get(edit_id)
        return tuple(Probe.from_dict(p) for p in record.probes)
