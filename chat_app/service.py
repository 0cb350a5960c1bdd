"""The one place where weights and ledger meet: compute → record → apply → verify → mark applied.

The ledger is the source of truth: start-up rebuilds the model as base weights plus every
applied edit, in order, from the stored factors. ``mark_applied`` (and its siblings) is each
operation's commit point, so a crash anywhere leaves the state before or after the operation.
Weight changes are serialised: an edit mutex orders edit operations, and a readers-writer lock
lets chats run beside edit computations but never beside a weight change.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from chat_app.completions import CompletionCache, complete_batch, weights_state
from chat_app.locks import RWLock
from chat_app.probes import (
    REPETITION_PENALTY, TopToken, answer, chat_question, stream_chat, top_next,
)
from chat_app.checks import LedgerChecks
from chat_app.guards import MAX_NOTE_CHARS, MIN_TARGET_PROB, EditGuards
from chat_app.later_checks import LaterChecks
from chat_app.results import ApplyResult, Probe
from chat_app.batch_service import BatchEdits
from chat_app.sync import LedgerSync, decode_record
from db import EditRecord, EventRecord, Ledger, LedgerError
from editing import EditRequest, RankOneEdit, RomeEditor
from editing.fact_payload import Applied, shares

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]


class ReadOnlyError(PermissionError):
    """The app runs read-only: edits, reverts and imports are refused."""


class EditService(EditGuards, BatchEdits, LedgerSync, LedgerChecks, LaterChecks):
    def __init__(self, editor: RomeEditor, ledger: Ledger, *, actor: str = "app", read_only: bool = False,
                 source: str | None = None) -> None:  # fmt: skip
        self.editor, self.ledger = editor, ledger
        self.source = source or str(getattr(editor.model.config, "name_or_path", "") or "unknown model")
        self.actor, self.read_only = actor, read_only
        self.weights = RWLock()
        self._edit_mutex = threading.Lock()
        self._edits: dict[int, Applied] = {}  # ledger id -> applied edit object (a batch fact: its shares)
        self.synced_at: float | None = None  # time.time() the weights were last checked against the ledger
        # ROME_CHAT_MIN_TARGET_PROB: tiny test models, which cannot become confident, run the app with 0;
        # 0 also lifts the check that the edited prompt's answer names the target, which they cannot meet
        self.min_target_prob = float(os.environ.get("ROME_CHAT_MIN_TARGET_PROB", MIN_TARGET_PROB))
        self.completions = CompletionCache()  # probe answers per weight state: preview's reused by apply
        self._jobs: dict = {}  # edit id -> its checks answered in the background (``LaterChecks``)

    # ----- reading -----------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.editor.model

    @property
    def tok(self) -> Any:
        return self.editor.tok

    @property
    def active_count(self) -> int:
        return len(self._edits)

    def history(self, status: str | None = None, text: str | None = None, batch: str | None = None) -> list[EditRecord]:
        return self.ledger.history(status=status or None, text=text or None, batch=batch or None)

    def record(self, edit_id: int) -> EditRecord:
        return self.ledger.get(edit_id)

    def events(self, edit_id: int | None = None) -> list[EventRecord]:
        return self.ledger.events(edit_id)

    def conflicts(self, request: EditRequest) -> list[EditRecord]:
        """Applied edits of the same subject and relation, which ``apply`` would supersede."""
        return self.ledger.find_applied(request.subject, request.relation)

    def preview(self, prompt: str, k: int = 5, question: str | None = None) -> tuple[str, list[TopToken]]:
        """The prompt's greedy completion and top next tokens; with ``question``, its chat reply is prepared
        (remembered, for the edit's chat row) too."""
        if not prompt.strip():
            raise ValueError("type a prompt to preview")
        with self.weights.read():
            if question:
                self.completions.answers(self.editor, [question], "chat")
            return self.completions.answers(self.editor, [prompt])[0], top_next(self.model, self.tok, prompt, k)

    def chat(self, messages: list[dict[str, str]], temperature: float = 0.0, max_new_tokens: int = 128,
             original: bool = False, repetition_penalty: float = REPETITION_PENALTY) -> Iterator[str]:  # fmt: skip
        """Stream a reply; ``original=True`` answers with the unedited weights (exact, nothing swapped globally)."""
        if not 0 <= temperature <= 5 or not 1 <= max_new_tokens <= 2048:
            raise ValueError("temperature must be in [0, 5] and max new tokens in [1, 2048]")
        if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) or not (
            1 <= repetition_penalty <= 2
        ):
            raise ValueError(f"repetition penalty must be between 1 (off) and 2, got {repetition_penalty!r}")
        with self.weights.read():
            context = self.editor.original_weights() if original else None
            yield from stream_chat(self.model, self.tok, messages, temperature, max_new_tokens, context,
                                   float(repetition_penalty))  # fmt: skip

    def export_model(self, dest: str | os.PathLike[str], fmt: str = "hf", ids: list[int] | None = None) -> Any:
        """Write the model with the applied edits (or ``ids`` of them) as hf, peft or gguf files; return a ``ModelExport``.

        Built on copies under the read lock: the running model and the ledger are unchanged.
        """
        from chat_app.export_model import write_model

        with self.weights.read():
            return write_model(self, dest, fmt, ids)

    # ----- changing ------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("this app runs read-only: edits, reverts and imports are disabled")

    def apply(
        self, request: EditRequest, *, paraphrases: list[str] = (), neighbours: list[str] = (),  # type: ignore[assignment]
        note: str | None = None, author: str | None = None, allow_outlier: bool = False, force: bool = False,
        progress: Progress | None = None, defer_checks: bool = False, **overrides: Any,
    ) -> ApplyResult:
        """Compute, check, record and apply an edit; supersede applied edits of the same subject and relation.

        The edit is computed, and its probes answered, on the weights it will be applied to: the
        applied edits less the ones it supersedes (a thread-local view; chats keep the live weights).
        When the edited prompt's greedy answer does not name the target, the edit is refused and
        recorded as such, unless ``force``: then it is applied and its probes record that it does not hold.
        ``defer_checks``: only the edited prompt is checked before returning; the other checks (listed
        in the result's ``pending``) are answered in the background and collected with ``checks``.
        """
        self._writable()
        prompts = self._probe_prompts(request, list(paraphrases), list(neighbours))
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise ValueError(f"notes are limited to {MAX_NOTE_CHARS} characters; this one has {len(note)}")
        actor = author or self.actor
        with self._edit_mutex:
            self._sync_locked()  # another instance's edits first: ours supersedes what it can see
            old = self.conflicts(request)
            old_edits = [self._edits[r.id] for r in old]
            with self.weights.read(), self.editor.view(without=_flat(old_edits)):
                self.editor.validate(request, **overrides)
                question = chat_question(request.subject, request.relation)  # the chat row: what users see
                texts = [p for p, _ in prompts]  # the preview's answers are reused, unless the view hides old edits
                state = weights_state(self.editor) if defer_checks else ()
                if old:
                    answers = complete_batch(self.model, self.tok, texts) + [answer(self.model, self.tok, question, "chat")]
                elif defer_checks:  # the edited prompt's answer now; the others, unless remembered, in the background
                    answers = self.completions.answers(self.editor, texts[:1]) + [
                        self.completions.remembered(state, p, k) for p, k in [*prompts[1:], (question, "chat")]]  # fmt: skip
                else:
                    answers = self.completions.answers(self.editor, texts) + self.completions.answers(
                        self.editor, [question], "chat")  # fmt: skip
                before = [(p, k, a) for (p, k), a in zip([*prompts, (question, "chat")], answers)]
                try:
                    edit = self.editor.compute(request, progress=progress, **overrides)
                except FloatingPointError as err:
                    self._refuse(request, str(err), actor, before[0][2])
                    raise ValueError(f"edit refused: {err}") from err
                reason = self._guard(edit, allow_outlier)
                now = before[:1] if defer_checks else before
                probes = () if reason else self._after_probes(request, edit, now, old_edits)
                pending = tuple(Probe.of(p, k, request.target, b) for p, k, b in before[len(now) :])  # None: later
            if not reason and not probes[0].holds and not force and self.min_target_prob > 0:
                reason = (f"the edited prompt still answers {probes[0].after!r}, which does not name {request.target!r}; "
                          "strengthen it (the form's Strengthen, the CLI's --strengthen), try another layer, or apply anyway (force)")  # fmt: skip
            if not reason and self._sync_locked():  # another instance changed the ledger meanwhile: see its edits
                old = self.conflicts(request)
                old_edits = [self._edits[r.id] for r in old]
            meta, factors = edit.to_payload()
            if reason:
                self.ledger.record_refused(meta, reason, factors, probes=[p.to_dict() for p in probes] or None,
                                           note=note, author=actor, answer_before=before[0][2])  # fmt: skip
                raise ValueError(f"edit refused: {reason}")
            edit_id = self.ledger.record_pending(meta, factors, note=note, author=actor, answer_before=before[0][2])
            try:
                with self.weights.write():
                    for edit_old in old_edits:
                        self.editor.revert(edit_old)
                    checksum = self.editor.apply(edit)
                    for record in old:
                        del self._edits[record.id]
                    self._edits[edit_id] = edit
                    self.ledger.mark_applied(
                        edit_id, checksum, answer_after=probes[0].after, probes=[p.to_dict() for p in probes],
                        actor=actor, supersedes=[r.id for r in old],
                    )  # fmt: skip
                    if old:
                        self._store_state_checksums({e.param_name for e in _flat(old_edits)})
                    self._remember(probes)
            except BaseException as err:
                self._resync(f"apply of edit #{edit_id} failed: {err}", failed_id=edit_id)
                raise
            if pending:
                self._defer_checks(edit_id, edit, probes, pending, state)
            if progress is not None:
                progress("done", 1.0)
            return ApplyResult(edit_id, self.ledger.get(edit_id), probes, tuple(r.id for r in old), edit.stats, pending)

    def _after_probes(self, request: EditRequest, edit: RankOneEdit, before: list[tuple[str, str, str]],
                      old: list[Applied]) -> tuple[Probe, ...]:  # fmt: skip
        """Each probe answered by the model as it will be once ``old`` is reverted and ``edit`` applied (this thread only)."""
        probes = [Probe.of(p, k, request.target, b) for p, k, b in before]
        with self.editor.view(without=_flat(old), extra=[edit]):
            return tuple(dataclasses.replace(p, after=a) for p, a in zip(probes, self._answers(probes)))

    def _answers(self, probes: Sequence[Probe]) -> list[str]:
        """What the model in this thread's view says to each probe (the completions as one batch), in order."""
        plain = iter(complete_batch(self.model, self.tok, [p.prompt for p in probes if p.kind != "chat"]))
        return [answer(self.model, self.tok, p.prompt, "chat") if p.kind == "chat" else next(plain) for p in probes]

    def _remember(self, probes: tuple[Probe, ...]) -> None:
        """The after-answers are the new weights' completions: the form's next preview reuses them."""
        state = weights_state(self.editor)
        for probe in probes:
            self.completions.put(state, probe.prompt, probe.after, "chat" if probe.kind == "chat" else "complete")

    def revert(self, edit_id: int, actor: str | None = None) -> EditRecord:
        """Remove an applied edit, in any order (its parameter is rebuilt from the baseline)."""
        self._writable()
        with self._edit_mutex:
            self._sync_locked()  # the edit may have been applied, or reverted, elsewhere
            record = self.ledger.get(edit_id)
            if record.status != "applied" or edit_id not in self._edits:
                raise ValueError(f"edit #{edit_id} is {record.status}, not applied; only applied edits can be reverted")
            try:
                with self.weights.write():
                    removed = self._edits.pop(edit_id)
                    self.editor.revert(removed)
                    self.ledger.mark_reverted(edit_id, actor=actor or self.actor)
            except BaseException as err:
                self._resync(f"revert of edit #{edit_id} failed: {err}")
                raise
            self._store_state_checksums({e.param_name for e in shares(removed)})
            return self.ledger.get(edit_id)

    def reapply(self, edit_id: int, actor: str | None = None) -> EditRecord:
        """Put a reverted or superseded edit back, at the end of the sequence (no recomputation)."""
        self._writable()
        with self._edit_mutex:
            self._sync_locked()
            record = self.ledger.get(edit_id)
            if record.status not in ("reverted", "superseded"):
                raise ValueError(f"edit #{edit_id} is {record.status}; only reverted or superseded edits can be re-applied")
            edit = decode_record(record)
            try:
                with self.weights.write():
                    checksum = self.editor.apply(edit)
                    self._edits[edit_id] = edit
                    self.ledger.mark_reapplied(edit_id, state_checksum=checksum, actor=actor or self.actor)
            except BaseException as err:
                self._resync(f"re-apply of edit #{edit_id} failed: {err}")
                raise
            return self.ledger.get(edit_id)

    def import_edits(
        self, items: list[tuple[Any, ...]], actor: str | None = None, allow_outlier: bool = False
    ) -> list[int]:
        """Apply imported edits in order and record them in one transaction (all or nothing).

        Each item: ``(meta, factors, probes, note, author, answer_before, answer_after, edit)``.
        An edit that does not fit this model's layers, or an update that ``apply`` would refuse as
        non-finite or an outlier, refuses the whole import before anything changes.
        """
        self._writable()
        if not items:
            return []
        with self._edit_mutex:
            self._sync_locked()
            for n, item in enumerate(items):
                reason = self._misfit(item[-1]) or self._unsafe(item[-1], allow_outlier)
                if reason:
                    prompt = shares(item[-1])[0].request.prompt
                    raise ValueError(f"import refused: edit {n} of the file ({prompt!r:.80}): {reason}")
            try:
                with self.weights.write():
                    entries = []
                    for meta, factors, probes, note, author, before, after, edit in items:
                        checksum = self.editor.apply(edit)
                        entries.append({"meta": meta, "factors": factors, "probes": probes, "note": note,
                                        "author": author, "answer_before": before, "answer_after": after,
                                        "state_checksum": checksum})  # fmt: skip
                    ids = self.ledger.record_imported(entries, actor=actor or self.actor)
                    for edit_id, item in zip(ids, items):
                        self._edits[edit_id] = item[-1]
            except BaseException as err:
                self._resync(f"import failed: {err}")
                raise
            return ids

    def _resync(self, why: str, failed_id: int | None = None) -> None:
        """After a failure: make the weights equal the ledger again (the ledger is the truth)."""
        log.error("%s; rebuilding the weights from the ledger", why)
        if failed_id is not None:
            try:
                if self.ledger.get(failed_id).status == "pending":
                    self.ledger.mark_failed(failed_id, why[:500], actor=self.actor)
            except (LedgerError, ValueError) as err:
                log.error("could not mark edit #%d failed: %s", failed_id, err)
        self._sync_locked(rebuild=True)

    def _store_state_checksums(self, names: set[str] | None = None) -> None:
        """After a rebuild, the checksum of each applied edit's parameter at its (new) position.

        Only edits of ``names`` (default: all) are hashed: removing an edit changes the states of
        later edits of its own parameter and of no other.
        """
        self.ledger.set_state_checksums({edit_id: c for edit_id, c in self._state_checksums(names) if c is not None})


def _flat(edits: list[Applied]) -> list[RankOneEdit]:
    """Every rank-one update of ``edits``, in order (a batch fact contributes its shares)."""
    return [share for edit in edits for share in shares(edit)]
