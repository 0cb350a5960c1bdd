"""The weights side of ``RomeEditor``: apply and revert edits exactly, and thread-local views of other weights.

Invariant: every edited parameter equals its baseline plus the applied edits' factors, added in
order (``_added``), so any revert is an exact rebuild.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from editing.arch import get_module, is_transposed, rank_one_delta
from editing.edit import RankOneEdit
from editing.fingerprint import tensor_checksum
from editing.memit import BatchEdit
from editing.nethook import replace_weights
from editing.placement import editable_weight


class EditedWeights:
    """Mixed into ``RomeEditor``, which sets the state declared here."""

    model: PreTrainedModel
    fingerprint: str
    _baseline: dict[str, torch.Tensor]
    _applied: list[RankOneEdit]
    _local: threading.local

    def _current(self, name: str) -> torch.Tensor:
        """The parameter as this thread's forward passes see it (``view`` overrides the live one)."""
        view = getattr(self._local, "view", None) or {}
        return view[name] if name in view else self.model.get_parameter(name).detach()

    def _sum(self, name: str, edits: Sequence[RankOneEdit]) -> torch.Tensor:
        """Baseline of ``name`` plus those of ``edits`` that touch it, added in order as ``_rebuild`` does."""
        tensor = self._baseline.get(name, self.model.get_parameter(name)).detach()
        for edit in edits:
            if edit.param_name == name:
                tensor = self._added(name, edit.value_dir, edit.key_dir, tensor)
        return tensor

    @contextmanager
    def view(self, without: Sequence[RankOneEdit] = (), extra: Sequence[RankOneEdit] = ()) -> Iterator[None]:
        """Forward passes and ``compute`` in this thread see the applied edits less ``without``, then ``extra``.

        The parameters are untouched: other threads see the live weights. The view's tensors are
        bit-identical to what ``revert`` of ``without`` followed by ``apply`` of ``extra`` would leave,
        so an edit computed inside ``view(without=old)`` is computed on the weights it will be applied to.
        """
        for edit in extra:
            self._check(edit)
        names = {e.param_name for e in (*without, *extra)}
        if not names:
            yield
            return
        kept = [e for e in self._applied if not any(e is w for w in without)] + list(extra)
        state = {name: self._sum(name, kept) for name in names}
        self._local.view, self._local.without = state, tuple(without)
        try:
            with replace_weights(self.model, state):
                yield
        finally:
            self._local.view, self._local.without = None, ()

    def _added(
        self, name: str, value_dir: torch.Tensor, key_dir: torch.Tensor, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``base`` (default: the parameter) plus ``value_dir ⊗ key_dir``, added in float32 and cast once (not in place)."""
        param = self.model.get_parameter(name) if base is None else base
        module = get_module(self.model, name.rsplit(".", 1)[0])
        delta = rank_one_delta(module, value_dir.to(param.device), key_dir.to(param.device))
        return (param.detach().float() + delta).to(param.dtype)

    def _check(self, edit: RankOneEdit) -> None:
        if edit.fingerprint != self.fingerprint:
            raise ValueError(
                f"this edit was made for another model (fingerprint {edit.fingerprint[:12]}…, "
                f"this model is {self.fingerprint[:12]}…)"
            )
        param = editable_weight(self.model, edit.param_name)  # an offloaded layer is refused here
        shape = param.shape
        module = get_module(self.model, edit.param_name.rsplit(".", 1)[0])
        d_out, d_in = (shape[1], shape[0]) if is_transposed(module) else (shape[0], shape[1])
        if edit.value_dir.numel() != d_out or edit.key_dir.numel() != d_in:
            raise ValueError(f"edit factors do not fit {edit.param_name} {tuple(shape)}")

    @torch.no_grad()
    def apply(self, edit: RankOneEdit | BatchEdit) -> str:
        """Add ``edit`` (or every share of a batch) on top of the applied ones; return the (last) parameter's checksum."""
        if isinstance(edit, BatchEdit):
            for share in edit.edits:
                self._check(share)
            return [self.apply(share) for share in edit.edits][-1]
        self._check(edit)
        if any(e is edit for e in self._applied):
            raise ValueError("this edit is already applied")
        param = self.model.get_parameter(edit.param_name)
        self._baseline.setdefault(edit.param_name, param.detach().clone())
        param.copy_(self._added(edit.param_name, edit.value_dir, edit.key_dir))
        self._applied.append(edit)
        return tensor_checksum(param)

    @torch.no_grad()
    def revert(self, edit: RankOneEdit | BatchEdit) -> str:
        """Remove ``edit`` (or a batch's shares): rebuild its parameters from the baseline plus the remaining edits."""
        removed = edit.edits if isinstance(edit, BatchEdit) else (edit,)
        if not all(any(e is r for e in self._applied) for r in removed):
            raise ValueError("this edit is not applied")
        self._applied = [e for e in self._applied if not any(e is r for r in removed)]
        return [self._rebuild(name) for name in dict.fromkeys(r.param_name for r in removed)][-1]

    @torch.no_grad()
    def _rebuild(self, name: str) -> str:
        param = self.model.get_parameter(name)
        param.copy_(self._baseline[name])
        for edit in self._applied:
            if edit.param_name == name:
                param.copy_(self._added(name, edit.value_dir, edit.key_dir))
        return tensor_checksum(param)

    @torch.no_grad()
    def rebuild(self, edits: list[RankOneEdit]) -> None:
        """Make the weights exactly baseline + ``edits`` in this order (e.g. to match a ledger)."""
        for edit in edits:
            self._check(edit)
            param = self.model.get_parameter(edit.param_name)
            self._baseline.setdefault(edit.param_name, param.detach().clone())
        self._applied = list(edits)
        for name in self._baseline:
            self._rebuild(name)

    @contextmanager
    def trial(self, names: Sequence[str]) -> Iterator[None]:
        """Edits applied inside are taken back on exit: the weights and the applied list as they were on entry.

        ``names``' parameters are restored from copies taken on entry, so leaving costs their size,
        not a rebuild from the baseline through every applied edit (linear in the ledger). A parameter
        outside ``names`` that changed inside is rebuilt as ``revert`` would.
        """
        saved = list(self._applied)
        copies = {name: self.model.get_parameter(name).detach().clone() for name in dict.fromkeys(names)}
        try:
            yield
        finally:
            now, before = self._applied, {id(e) for e in saved}
            after = {id(e) for e in now}
            changed = {e.param_name for e in now if id(e) not in before} | {e.param_name for e in saved if id(e) not in after}
            self._applied = saved
            with torch.no_grad():
                for name, tensor in copies.items():
                    self.model.get_parameter(name).copy_(tensor)
            for name in changed - copies.keys():
                self._rebuild(name)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the unedited weights."""
        for name, base in self._baseline.items():
            self.model.get_parameter(name).copy_(base)
        self._applied = []

    @torch.no_grad()
    def sequence_checksums(self, names: set[str] | None = None) -> list[str | None]:
        """For each applied edit, in order: its parameter's checksum right after it was added.

        With ``names``, only edits of those parameters are hashed (the others get None): a revert
        changes the states of later edits of its own parameter only.
        """
        state = {name: base for name, base in self._baseline.items() if names is None or name in names}
        sums: list[str | None] = []
        for edit in self._applied:
            if edit.param_name not in state:
                sums.append(None)
                continue
            state[edit.param_name] = self._added(edit.param_name, edit.value_dir, edit.key_dir, state[edit.param_name])
            sums.append(tensor_checksum(state[edit.param_name]))
        return sums

    @torch.no_grad()
    def weights_with(self, edits: list[RankOneEdit]) -> dict[str, torch.Tensor]:
        """Every parameter the applied edits or ``edits`` touch, as its baseline plus ``edits`` in order.

        New tensors, added exactly as ``apply`` adds them (so with ``edits == applied`` they equal the
        live weights bit for bit); the model's weights are unchanged on return.
        """
        for edit in edits:
            self._check(edit)
        names = list(self._baseline) + [e.param_name for e in edits if e.param_name not in self._baseline]
        state = {name: self._baseline.get(name, self.model.get_parameter(name)).detach().clone() for name in names}
        for edit in edits:
            state[edit.param_name] = self._added(edit.param_name, edit.value_dir, edit.key_dir, state[edit.param_name])
        return state

    @property
    def applied(self) -> tuple[RankOneEdit, ...]:
        return tuple(self._applied)

    @contextmanager
    def original_weights(self) -> Iterator[None]:
        """Forward passes in this thread see the unedited weights; the parameters are not touched."""
        with replace_weights(self.model, dict(self._baseline)):
            yield
