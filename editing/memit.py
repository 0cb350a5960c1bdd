"""MEMIT batch edits (Meng et al. 2023): many facts at once, spread over several layers.

For each fact i the value optimisation finds δ_i, the change of the residual stream after the
last edited layer L at the subject's last token that makes the model say the target; z_i is
that residual plus δ_i. Then, layer by layer (lowest first, each layer's update applied before
the next layer's keys are read), with K (d_in, n) the facts' keys and R (d_out, n) the residual
still missing at L divided by the number of layers left:

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹ = Σ_i r_i (M k_i)ᵀ,   M = (λ C_l + K Kᵀ)⁻¹  (symmetric)

(with ``cache_weight`` > 0, M also holds ``K_c K_cᵀ``, the keys of the edits already applied at l, so
a batch, or a single fact edited this way, leaves earlier edits' outputs where they were)

so fact i's share of layer l is the rank-one ``r_i ⊗ M k_i``: a ``RankOneEdit`` of its own. A
``BatchEdit`` is these shares; reverting one fact removes its shares and rebuilds exactly from
the others (the other facts keep the shares computed with it in K, as stored).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editing.arch import layer_name
from editing.edit import RankOneEdit
from editing.layers import can_start_midway, run_from
from editing.nethook import StopForward, capture_input, edit_output, run_until
from editing.placement import input_device
from editing.projection import projected_solve
from editing.rome import Progress, pad_batch
from editing.rows import Row

if TYPE_CHECKING:
    from editing.editor import RomeEditor
    from editing.request import EditRequest


@dataclass(frozen=True, eq=False)
class BatchEdit:
    """Facts edited together; ``facts[i]`` holds fact i's share at each layer, lowest layer first."""

    batch_id: str
    facts: tuple[tuple[RankOneEdit, ...], ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def edits(self) -> tuple[RankOneEdit, ...]:
        """Every share, in the order ``editor.apply`` adds them (fact by fact)."""
        return tuple(e for shares in self.facts for e in shares)

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return tuple(shares[0].request for shares in self.facts)

    def fact(self, index: int) -> BatchEdit:
        """Fact ``index`` alone, as a batch of one (to revert or re-apply it by itself)."""
        return BatchEdit(self.batch_id, (self.facts[index],), self.stats)


@torch.no_grad()
def hidden_after(model: torch.nn.Module, layer: int, rows: Sequence[Row], pad_id: int) -> torch.Tensor:
    """The residual stream after block ``layer`` at each row's ``lookup``, averaged over rows. (d,) float32."""
    ids, mask = pad_batch([r.input_ids for r in rows], pad_id, input_device(model))
    box: dict[str, torch.Tensor] = {}

    def record(out: torch.Tensor) -> None:
        box["out"] = out.detach()

    with edit_output(model, layer_name(model, layer), record):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    out = box["out"]  # (B, T, d) on block ``layer``'s device
    lookups = torch.tensor([r.lookup for r in rows], device=out.device)
    return out[torch.arange(len(rows), device=out.device), lookups].float().mean(0)


@dataclass
class _Chunk:
    """Rows of several facts (sorted by length, so little padding) that share a forward pass."""

    ids: torch.Tensor  # (b, T)
    mask: torch.Tensor  # (b, T)
    lookups: torch.Tensor  # (b,)
    fact_of_row: torch.Tensor  # (b,) the fact each row belongs to, in the whole batch
    start: torch.Tensor | None = None  # (b, T, d): the input of the block the next read starts at


class LayerReader:
    """Each fact's key k* at every batch layer, and its residual after the last layer, read layer by layer.

    ``read(j)`` gives ``(K, H)`` for ``layers[j]`` on the weights as they are now: K (d_in, n) the keys at
    that layer, H (d, n) the residual after block ``layers[-1]``, each averaged over the fact's rows
    (``compute_key`` and ``hidden_after`` for every fact); ``read(0)`` also keeps ``last_keys``, the
    keys at ``layers[-1]`` (the value optimisation's). Between reads the caller adds layer
    ``layers[j]``'s update, which leaves everything below block ``layers[j]`` as it was; so where the
    family's blocks can be called directly (``can_start_midway``), read j + 1 starts from that block's
    input, kept from read j: blocks ``layers[j]…layers[-1]`` instead of ``0…layers[-1]``. Rows of all
    facts are sorted by length and cut into chunks of at most ``max_rows``. float32, CPU.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], key_rows: Sequence[Sequence[Row]], pad_id: int,
                 max_rows: int = 512) -> None:  # fmt: skip
        self.model, self.layers, self.n = model, tuple(layers), len(key_rows)
        self.midway = can_start_midway(model)
        self.last_keys: torch.Tensor | None = None
        self._read = -1
        flat = [(i, r) for i, fact in enumerate(key_rows) for r in fact]
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][1].input_ids))
        self.counts = torch.bincount(torch.tensor([i for i, _ in flat]), minlength=self.n).float()[:, None]  # (n, 1)
        self.chunks = []
        for first in range(0, len(order), max_rows):
            part = [flat[k] for k in order[first : first + max_rows]]
            ids, mask = pad_batch([r.input_ids for _, r in part], pad_id, input_device(model))
            self.chunks.append(_Chunk(ids, mask, torch.tensor([r.lookup for _, r in part]),
                                      torch.tensor([i for i, _ in part])))  # fmt: skip

    @torch.no_grad()
    def read(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j != self._read + 1:
            raise ValueError(f"layers are read in order: read {self._read + 1} comes next, not {j}")
        self._read = j
        layer, last = self.layers[j], self.layers[-1]
        sums: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            found = self._pass(chunk, j)
            for name, states in found.items():  # each (b, T, d) on its block's device: keep the lookups
                picked = states[torch.arange(len(chunk.lookups), device=states.device), chunk.lookups.to(states.device)]
                total = torch.zeros(self.n, picked.shape[1]).index_add(0, chunk.fact_of_row, picked.float().cpu())
                sums[name] = sums[name] + total if name in sums else total
        if j == 0:
            self.last_keys = (sums["last_key"] / self.counts).T if layer != last else (sums["key"] / self.counts).T
        return (sums["key"] / self.counts).T, (sums["hidden"] / self.counts).T

    def _pass(self, chunk: _Chunk, j: int) -> dict[str, torch.Tensor]:
        """One forward pass of ``chunk`` for read ``j``: the key inputs at ``layers[j]`` (and at the last layer on
        read 0), the output of the last block, and (for the next read) block ``layers[j]``'s input."""
        model, layer, last = self.model, self.layers[j], self.layers[-1]
        keep_start = self.midway and j + 1 < len(self.layers)
        box: dict[str, torch.Tensor] = {}

        def record(out: torch.Tensor) -> None:
            box["hidden"] = out.detach()
            raise StopForward  # nothing above block ``last`` is needed

        with ExitStack() as stack:
            key_box = stack.enter_context(capture_input(model, layer_name(model, layer, "mlp_out")))
            start_box = stack.enter_context(capture_input(model, layer_name(model, layer))) if keep_start else {}
            last_box = stack.enter_context(capture_input(model, layer_name(model, last, "mlp_out"))) \
                if j == 0 and layer != last else {}  # fmt: skip
            if j > 0 and self.midway and chunk.start is not None:
                positions = torch.arange(chunk.ids.shape[1], device=chunk.ids.device)[None].expand_as(chunk.ids)
                box["hidden"] = run_from(model, self.layers[j - 1], chunk.start, chunk.mask, positions, None, until=last)
            else:
                stack.enter_context(edit_output(model, layer_name(model, last), record))
                run_until(model, input_ids=chunk.ids, attention_mask=chunk.mask, use_cache=False)
        chunk.start = start_box["input"].detach() if keep_start else None
        found = {"key": key_box["input"], "hidden": box["hidden"]}
        if last_box:
            found["last_key"] = last_box["input"]
        return found


def layer_shares(
    cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, weight: float,
    cache_gram: torch.Tensor | None = None, cache_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, key_dirs)``: ``values`` = R (d_out, n), ``key_dirs`` = M K (d_in, n), so ΔW = values @ key_dirsᵀ.

    ``cache_gram`` is K_c K_cᵀ (d_in, d_in) for the keys K_c of the edits already applied at this layer
    (``editor.cache_gram``): with it in M, the update also keeps those keys' outputs (``ΔW K_c ≈ 0``),
    which is what lets edits made one after another coexist. Solved in float64 on the CPU; returned in float32.
    """
    k = keys.double().cpu()
    system = weight * cov.double().cpu() + k @ k.T  # (d_in, d_in), symmetric positive definite
    if cache_gram is not None and cache_weight > 0:
        system += cache_weight * cache_gram
    key_dirs = torch.linalg.solve(system, k)  # (d_in, n)
    return resid.float().cpu(), key_dirs.float()


def projected_shares(
    basis: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, cache_gram: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's layer update as ``(values, key_dirs)``: ΔW = R Kᵀ P (P (K_c K_cᵀ + K Kᵀ) + α I)⁻¹ᵀ.

    P = ÛÛᵀ (``basis`` Û) projects onto the directions of C with small eigenvalues (``editing.projection``):
    the key directions lie in its range, so a key that P removes (preserved knowledge) sees no change, and
    the keys of the edits already applied (``cache_gram`` = Ûᵀ K_c K_cᵀ Û) almost none. Fact i's share is
    ``r_i ⊗ x_i`` with x = (P (K_c K_cᵀ + K Kᵀ) + α I)⁻¹ P k_i (``projected_solve``). float32 out.
    """
    key_dirs = projected_solve(basis, keys, cache_gram, l2)  # (d_in, n)
    return resid.float().cpu(), key_dirs.float()


def new_batch_id() -> str:
    return uuid.uuid4().hex[:12]


def share_stats(batch_id: str, index: int, size: int, layers: Sequence[int], extra: dict[str, Any]) -> dict[str, Any]:
    """What each share records in its stats (and so in the ledger's meta): the batch it belongs to."""
    return {**extra, "batch": {"id": batch_id, "fact": index, "size": size, "layers": list(layers)}}


def _check_requests(requests: Sequence[EditRequest]) -> None:
    if not requests:
        raise ValueError("a batch needs at least one fact")
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        key = (r.subject.casefold(), r.relation.casefold())
        if key in seen:
            raise ValueError(f"facts {seen[key] + 1} and {i + 1} have the same subject and relation ({r.prompt!r})")
        seen[key] = i


def _extra_rows(editor: RomeEditor, request: EditRequest, batch_keys: str) -> list[Row]:
    """The rows whose keys are key columns beside k* for ``batch_keys``: none, ``exact_rows``, or its first (the bare prompt)."""
    if batch_keys == "mean":
        return []
    rows = editor.exact_rows(request)
    return rows[:1] if batch_keys == "prompt" else rows


def compute_batch(
    editor: RomeEditor, requests: Sequence[EditRequest], progress: Progress | None = None, **overrides: object
) -> BatchEdit:
    """MEMIT over ``hp.batch_layers`` for ``requests`` on the current weights; the weights are unchanged on return.

    With ``update="alphaedit"`` each layer's update is AlphaEdit's projected solve instead of MEMIT's.
    """
    from editing.value_batch import optimise_values  # value imports rome; keep this module's import graph flat

    _check_requests(requests)
    hp = editor.hparams_for(requests[0], **overrides)
    projected = hp.update == "alphaedit"  # AlphaEdit's null-space projection at every layer; otherwise MEMIT's solve
    layers = editor.batch_layers(hp)
    rows = [editor.rows(r, hp) for r in requests]
    model, pad, last, n = editor.model, editor.tok.pad_token_id, layers[-1], len(requests)
    # batch_keys="exact" ("prompt"): each fact's bare prompt and chat contexts (the bare prompt only) are key
    # columns of their own in every layer's solve, with the fact's residual as their target; owner[c] is column c's fact
    extra_rows = [_extra_rows(editor, r, hp.batch_keys) for r in requests]
    owner = torch.tensor(list(range(n)) + [i for i, fact in enumerate(extra_rows) for _ in fact])
    # column c weighs w_c in the least squares: solved with √w_c k_c, and its key direction scaled by √w_c again
    root_w = torch.ones(len(owner))
    root_w[n:] = hp.batch_key_weight**0.5
    for layer in layers:
        editor.cov(layer, hp.stats_samples, progress)
    t0 = time.perf_counter()
    reader = LayerReader(model, layers, [r[0] for r in rows] + [[row] for fact in extra_rows for row in fact], pad)
    first_keys, first_hidden = reader.read(0)  # nothing is applied yet: the residual after ``last`` is the unedited one
    assert reader.last_keys is not None
    results = optimise_values(
        model, hp.replace(layer=last), reader.last_keys[:, :n].T, [(values, kl) for _, values, kl in rows], pad,
        editor.method, progress,
    )  # fmt: skip
    # z_i: the residual after the last layer that says the target. (d, n)
    z = first_hidden[:, :n] + torch.stack([v.delta.cpu() for v in results], 1)
    value_s = time.perf_counter() - t0
    batch_id = new_batch_id()
    shares: list[list[RankOneEdit]] = [[] for _ in requests]
    with editor.trial([editor.param_name(layer) for layer in layers]):
        for j, layer in enumerate(layers):
            keys, hidden = (first_keys, first_hidden) if j == 0 else reader.read(j)
            if progress is not None:
                progress("update", (j + 1) / len(layers))
            resid = (z - hidden[:, :n]) / (len(layers) - j)
            weighted = keys * root_w.to(keys.device)
            if projected:  # the cache is read before this layer's shares are added
                projection = editor.projection(layer, hp.stats_samples, hp.null_space_threshold)
                gram, cached = editor.cache_gram(layer, projection.basis)
                values, key_dirs = projected_shares(projection.basis, weighted, resid, gram, hp.cache_l2)
                kept = {"projection_dims": projection.dims}
            else:
                gram, cached = editor.cache_gram(layer)
                values, key_dirs = layer_shares(editor.cov(layer, hp.stats_samples), weighted, resid, hp.mom2_weight,
                                                gram if cached else None, hp.cache_weight)  # fmt: skip
                kept = {}
            if len(owner) > n:  # ΔW = Σ_c w_c r_owner(c) (M k_c)ᵀ: still one rank-one share per fact
                key_dirs = torch.zeros(key_dirs.shape[0], n).index_add(1, owner, key_dirs * root_w)
            name = editor.param_name(layer)
            layer_hp = {**hp.replace(layer=layer).to_dict(), "update": "alphaedit" if projected else "memit",
                        "batch_layers": list(layers)}  # fmt: skip
            for i, request in enumerate(requests):
                extra = {"update_norm": float(values[:, i].norm() * key_dirs[:, i].norm()), "cache_keys": cached,
                         "steps": results[i].steps, "target_prob": results[i].target_prob, "exact_key_columns": len(extra_rows[i]),
                         "delta_norm": float(results[i].delta.norm()), "v0_norm": results[i].v0_norm, **kept}
                shares[i].append(RankOneEdit(
                    request=request, layer=layer, param_name=name, value_dir=values[:, i].clone(),
                    key_dir=key_dirs[:, i].clone(), hparams=layer_hp, fingerprint=editor.fingerprint,
                    checksum_before="", checksum_after="", key=keys[:, i].clone(),
                    extra_keys=keys[:, owner == i][:, 1:].T.clone() if len(extra_rows[i]) else None,
                    stats=share_stats(batch_id, i, len(requests), layers, extra),
                ))  # fmt: skip
                editor.apply(shares[i][-1])  # the next layer's keys and residuals see this one
    return editor.with_checksums(BatchEdit(batch_id, tuple(tuple(s) for s in shares), {
        "layers": list(layers), "value_s": round(value_s, 4), "seconds": round(time.perf_counter() - t0, 4),
        "mean_steps": sum(r.steps for r in results) / len(results),
    }))
