"""MEMIT batches through the service: many facts computed together, each recorded as its own ledger edit.

``apply_batch`` follows ``apply``'s rules: the ledger first (another instance's edits are
loaded before anything is computed), applied edits of the same facts are superseded (the batch
is computed on the weights without them), and the weights and the ledger change together. The
batch is computed under the weights' write lock (``compute_batch`` adds each layer's shares to
the live weights before it reads the next layer's keys), so chats wait while it runs. All
facts are recorded in one transaction, after the weights took them: if anything fails before
that commit, the weights are rebuilt from the ledger, so nothing of the batch is applied. Each
fact keeps its own factors at every batch layer, so one fact can be reverted (or re-applied)
alone, exactly; ``revert_batch`` and ``reapply_batch`` do the whole batch in one transaction.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from chat_app.completions import complete_batch
from chat_app.locks import RWLock
from chat_app.results import BatchResult, Probe
from db import EditRecord, Ledger
from db.queries import normalise
from editing import EditRequest, RomeEditor
from editing.fact_payload import Applied, decode_payload, fact_payload, shares
from editing.memit import BatchEdit

Progress = Callable[[str, float], None]
Checks = tuple[Sequence[str], Sequence[str]]  # (paraphrases, neighbours) of one fact
MAX_BATCH = 500  # as a fact file


class BatchEdits:
    """Mixed into ``EditService``, which sets up the state and the helpers declared here."""

    editor: RomeEditor
    ledger: Ledger
    weights: RWLock
    actor: str
    model: Any
    tok: Any
    _edit_mutex: threading.Lock
    _edits: dict[int, Applied]
    _writable: Callable[[], None]
    _probe_prompts: Callable[[EditRequest, list[str], list[str]], list[tuple[str, str]]]
    _unsafe: Callable[[Applied, bool], str | None]
    _sync_locked: Callable[..., bool]
    _resync: Callable[..., None]
    _store_state_checksums: Callable[..., None]

    def apply_batch(
        self, requests: Sequence[EditRequest], *, checks: Sequence[Checks] | None = None, note: str | None = None,
        author: str | None = None, allow_outlier: bool = False, progress: Progress | None = None, **overrides: Any,
    ) -> BatchResult:
        """Compute the facts as one MEMIT batch, record each fact as an edit of the batch, and apply them together.

        The weights are unchanged, and nothing is recorded as applied, unless every fact was
        recorded: a failure rebuilds the weights from the ledger. A non-finite or outlier update
        refuses the whole batch (recorded as refused). A fact whose own prompt does not give its
        target afterwards is applied and shown as not holding (its 'edited' probe).
        """
        self._writable()
        requests = list(requests)
        if not 1 <= len(requests) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} facts; this one has {len(requests)}")
        if len({r.layer for r in requests}) > 1:
            raise ValueError("a batch edits every fact at the same layers; give no layer, or the same one, for all facts")
        checks = list(checks) if checks is not None else [((), ())] * len(requests)
        if len(checks) != len(requests):
            raise ValueError("give one (paraphrases, neighbours) pair per fact, or none")
        if note is not None and len(note) > 500:
            raise ValueError(f"notes are limited to 500 characters; this one has {len(note)}")
        prompts = [self._probe_prompts(r, list(p), list(n)) for r, (p, n) in zip(requests, checks)]
        actor = author or self.actor
        with self._edit_mutex:
            self._sync_locked()  # another instance's edits first: the batch supersedes what it can see
            with self.weights.read():
                for request in requests:
                    self.editor.validate(request, **overrides)
            old = self._batch_conflicts(requests)
            batch, befores, probes, reason = self._compute_batch(requests, prompts, old, allow_outlier, progress,
                                                                 overrides)  # fmt: skip
            entries = [self._entry(batch, i, probes, befores, note, actor) for i in range(len(requests))]
            if reason:
                self.ledger.record_batch(entries, refused=reason, actor=actor)
                raise ValueError(f"batch refused: {reason}")
            if self._sync_locked():  # another instance changed the ledger meanwhile: see its edits
                old = self._batch_conflicts(requests)
            ids = self._commit_batch(batch, [batch.fact(i) for i in range(len(requests))], entries, old, actor)
            if progress is not None:
                progress("done", 1.0)
            records = {r.id: r for r in self.ledger.batch(batch.batch_id)}
            return BatchResult(batch.batch_id, tuple(ids), tuple(records[i] for i in ids),
                               tuple(tuple(p) for p in probes), tuple(r.id for r in old), batch.stats)  # fmt: skip

    def _compute_batch(self, requests: list[EditRequest], prompts: list[list[tuple[str, str]]], old: list[EditRecord],
                       allow_outlier: bool, progress: Progress | None, overrides: dict[str, Any],
                       ) -> tuple[BatchEdit, list[list[str]], list[list[Probe]], str | None]:  # fmt: skip
        """The batch, each fact's probe answers before and after, and why it must be refused (or None).

        Under the weights' write lock: ``compute_batch`` adds each layer's shares to the live weights
        before reading the next layer's keys, and the batch is computed, and probed, on the weights
        it will be applied to (without the edits it supersedes). The weights are as before on return.
        """
        saved = list(self.editor.applied)
        try:
            with self.weights.write():
                for record in old:
                    self.editor.revert(self._edits[record.id])
                befores = [complete_batch(self.model, self.tok, [p for p, _ in ps]) for ps in prompts]
                try:
                    batch = self.editor.compute_batch(requests, progress=progress, **overrides)
                except FloatingPointError as err:
                    raise ValueError(f"batch refused: {err}") from err
                reason = next((r for r in (self._unsafe(batch.fact(i), allow_outlier)
                                           for i in range(len(requests))) if r), None)  # fmt: skip
                probes = [] if reason else self._batch_probes(requests, prompts, befores, batch)
                self.editor.rebuild(saved)  # exactly the weights before: baseline + the same edits in order
        except BaseException as err:
            self._resync(f"batch computation failed, nothing applied: {err}")
            raise
        return batch, befores, probes, reason

    def _commit_batch(self, batch: BatchEdit, facts: list[BatchEdit], entries: list[dict[str, Any]],
                      old: list[EditRecord], actor: str) -> list[int]:  # fmt: skip
        """Revert the superseded edits, apply every fact, record them all in one transaction; on failure, rebuild."""
        try:
            with self.weights.write():
                old_edits = [self._edits[r.id] for r in old]
                for edit in old_edits:
                    self.editor.revert(edit)
                for entry, fact in zip(entries, facts):
                    entry["state_checksum"] = self.editor.apply(fact)
                ids = self.ledger.record_batch(entries, supersedes=[r.id for r in old], actor=actor)
                for record in old:
                    del self._edits[record.id]
                self._edits.update(zip(ids, facts))
                if old:
                    self._store_state_checksums({s.param_name for e in old_edits for s in shares(e)})
        except BaseException as err:
            self._resync(f"batch {batch.batch_id} failed, nothing of it applied: {err}")
            raise
        return ids

    def _entry(self, batch: BatchEdit, i: int, probes: list[list[Probe]], befores: list[list[str]],
               note: str | None, actor: str) -> dict[str, Any]:  # fmt: skip
        meta, factors = fact_payload(batch, i)
        own = probes[i] if probes else []
        return {"meta": meta, "factors": factors, "probes": [p.to_dict() for p in own] or None, "note": note,
                "author": actor, "answer_before": befores[i][0], "answer_after": own[0].after if own else None}  # fmt: skip

    def _batch_conflicts(self, requests: Sequence[EditRequest]) -> list[EditRecord]:
        """Applied edits of the batch's facts (subject and relation equal up to case and spacing), which it supersedes."""
        keys = {(normalise(r.subject), normalise(r.relation)) for r in requests}
        return [r for r in self.ledger.applied() if (normalise(r.subject), normalise(r.relation)) in keys]

    def _batch_probes(self, requests: list[EditRequest], prompts: list[list[tuple[str, str]]], befores: list[list[str]],
                      batch: BatchEdit) -> list[list[Probe]]:  # fmt: skip
        """Each fact's probes answered with the batch added to the current weights (the caller holds the write lock)."""
        self.editor.apply(batch)
        try:
            afters = [complete_batch(self.model, self.tok, [p for p, _ in ps]) for ps in prompts]
        finally:
            self.editor.revert(batch)
        return [[Probe.of(p, k, r.target, b, a) for (p, k), b, a in zip(ps, bs, As)]
                for r, ps, bs, As in zip(requests, prompts, befores, afters)]  # fmt: skip

    def revert_batch(self, batch_id: str, actor: str | None = None) -> list[EditRecord]:
        """Revert every applied fact of a batch in one transaction; the others stay as they are."""
        self._writable()
        with self._edit_mutex:
            self._sync_locked()
            records = self._batch_records(batch_id)
            applied = [r for r in records if r.status == "applied" and r.id in self._edits]
            if not applied:
                raise ValueError(f"no fact of batch {batch_id} is applied; nothing to revert")
            try:
                with self.weights.write():
                    removed = [self._edits[r.id] for r in applied]
                    self.editor.revert(BatchEdit(batch_id, tuple(shares(e) for e in removed)))
                    self.ledger.mark_reverted_many([r.id for r in applied], actor=actor or self.actor,
                                                   detail=f"batch {batch_id} reverted")  # fmt: skip
                    for record in applied:
                        del self._edits[record.id]
            except BaseException as err:
                self._resync(f"revert of batch {batch_id} failed: {err}")
                raise
            self._store_state_checksums({s.param_name for e in removed for s in shares(e)})
            return self.ledger.batch(batch_id)

    def reapply_batch(self, batch_id: str, actor: str | None = None) -> list[EditRecord]:
        """Put the reverted facts of a batch back, in batch order, at the end of the sequence (no recomputation)."""
        self._writable()
        with self._edit_mutex:
            self._sync_locked()
            records = [r for r in self._batch_records(batch_id) if r.status == "reverted"]
            if not records:
                raise ValueError(f"no fact of batch {batch_id} is reverted; nothing to re-apply")
            edits = [decode_payload(r.meta, r.factors or b"") for r in records]
            try:
                with self.weights.write():
                    sums = {r.id: self.editor.apply(e) for r, e in zip(records, edits)}
                    self.ledger.mark_reapplied_many(sums, actor=actor or self.actor, detail=f"batch {batch_id} re-applied")
                    self._edits.update((r.id, e) for r, e in zip(records, edits))
            except BaseException as err:
                self._resync(f"re-apply of batch {batch_id} failed: {err}")
                raise
            return self.ledger.batch(batch_id)

    def _batch_records(self, batch_id: str) -> list[EditRecord]:
        if not isinstance(batch_id, str) or not batch_id.strip():
            raise ValueError("give a batch id (the History's batch column)")
        records = self.ledger.batch(batch_id.strip())
        if not records:
            raise ValueError(f"no batch {batch_id!r} in the ledger")
        return records
