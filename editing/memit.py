"""MEMIT batch edits (Meng et al. 2023): many facts at once, spread over several layers.

For each fact i the value optimisation finds δ_i, the change of the residual stream after the
last edited layer L at the subject's last token that makes the model say the target; z_i is
that residual plus δ_i. Then, layer by layer (lowest first, each layer's update applied before
the next layer's keys are read), with K (d_in, n) the facts' keys and R (d_out, n) the residual
still missing at L divided by the number of layers left:

    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹ = Σ_i r_i (M k_i)ᵀ,   M = (λ C_l + K Kᵀ)⁻¹  (symmetric)

so fact i's share of layer l is the rank-one ``r_i ⊗ M k_i``: a ``RankOneEdit`` of its own. A
``BatchEdit`` is these shares; reverting one fact removes its shares and rebuilds exactly from
the others (the other facts keep the shares computed with it in K, as stored).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editing.arch import layer_name
from editing.edit import RankOneEdit
from editing.nethook import StopForward, capture_input, edit_output, run_until
from editing.placement import input_device
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


@torch.no_grad()
def keys_and_hidden(
    model: torch.nn.Module, layer: int, last: int, key_rows: Sequence[Sequence[Row]], pad_id: int, group: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, H)``: each fact's key k* at ``layer`` (d_in, n) and residual after block ``last`` (d, n) at its
    subject's last token, averaged over the fact's rows (``compute_key`` and ``hidden_after`` for every fact),
    ``group`` facts' rows to a forward pass that stops after block ``last``. float32, CPU."""
    keys, hidden = [], []
    for start in range(0, len(key_rows), group):
        part = key_rows[start : start + group]
        rows = [r for fact in part for r in fact]
        fact_of_row = torch.tensor([i for i, fact in enumerate(part) for _ in fact])
        lookups = torch.tensor([r.lookup for r in rows])
        ids, mask = pad_batch([r.input_ids for r in rows], pad_id, input_device(model))
        box: dict[str, torch.Tensor] = {}

        def record(out: torch.Tensor) -> None:
            box["out"] = out.detach()
            raise StopForward  # nothing above block ``last`` is needed

        with capture_input(model, layer_name(model, layer, "mlp_out")) as key_box, \
                edit_output(model, layer_name(model, last), record):  # fmt: skip
            run_until(model, input_ids=ids, attention_mask=mask, use_cache=False)
        counts = torch.bincount(fact_of_row, minlength=len(part)).float()[:, None]  # (f, 1)
        for out, found in ((keys, key_box["input"]), (hidden, box["out"])):  # each on its block's device
            picked = found[torch.arange(len(rows), device=found.device), lookups.to(found.device)].float().cpu()
            out.append(torch.zeros(len(part), picked.shape[1]).index_add(0, fact_of_row, picked) / counts)  # (f, d)
    return torch.cat(keys).T, torch.cat(hidden).T


def layer_shares(
    cov: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, key_dirs)``: ``values`` = R (d_out, n), ``key_dirs`` = M K (d_in, n), so ΔW = values @ key_dirsᵀ.

    Solved in float64 on the CPU; returned in float32.
    """
    k = keys.double().cpu()
    system = weight * cov.double().cpu() + k @ k.T  # (d_in, d_in), symmetric positive definite
    key_dirs = torch.linalg.solve(system, k)  # (d_in, n)
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


def compute_batch(
    editor: RomeEditor, requests: Sequence[EditRequest], progress: Progress | None = None, **overrides: object
) -> BatchEdit:
    """MEMIT over ``hp.batch_layers`` for ``requests`` on the current weights; the weights are unchanged on return."""
    from editing.value_batch import optimise_values  # value imports rome; keep this module's import graph flat

    _check_requests(requests)
    hp = editor.hparams_for(requests[0], **overrides)
    layers = editor.batch_layers(hp)
    rows = [editor.rows(r, hp) for r in requests]
    model, pad, last = editor.model, editor.tok.pad_token_id, layers[-1]
    for layer in layers:
        editor.cov(layer, hp.stats_samples, progress)
    t0 = time.perf_counter()
    key_rows = [r[0] for r in rows]
    keys, hidden = keys_and_hidden(model, last, last, key_rows, pad)
    results = optimise_values(
        model, hp.replace(layer=last), keys.T, [(values, kl) for _, values, kl in rows], pad, editor.method, progress
    )
    # z_i: the residual after the last layer that says the target. (d, n)
    z = hidden + torch.stack([v.delta.cpu() for v in results], 1)
    value_s = time.perf_counter() - t0
    batch_id = new_batch_id()
    saved = editor.applied
    shares: list[list[RankOneEdit]] = [[] for _ in requests]
    try:
        for j, layer in enumerate(layers):
            if j > 0 or layer != last:  # otherwise: nothing is applied yet, and the keys are those at ``last``
                keys, hidden = keys_and_hidden(model, layer, last, key_rows, pad)
            if progress is not None:
                progress("update", (j + 1) / len(layers))
            resid = (z - hidden) / (len(layers) - j)
            values, key_dirs = layer_shares(editor.cov(layer, hp.stats_samples), keys, resid, hp.mom2_weight)
            name = editor.param_name(layer)
            layer_hp = {**hp.replace(layer=layer).to_dict(), "update": "memit", "batch_layers": list(layers)}
            for i, request in enumerate(requests):
                extra = {"update_norm": float(values[:, i].norm() * key_dirs[:, i].norm()),
                         "steps": results[i].steps, "target_prob": results[i].target_prob,
                         "delta_norm": float(results[i].delta.norm()), "v0_norm": results[i].v0_norm}
                shares[i].append(RankOneEdit(
                    request=request, layer=layer, param_name=name, value_dir=values[:, i].clone(),
                    key_dir=key_dirs[:, i].clone(), hparams=layer_hp, fingerprint=editor.fingerprint,
                    checksum_before="", checksum_after="", key=keys[:, i].clone(),
                    stats=share_stats(batch_id, i, len(requests), layers, extra),
                ))  # fmt: skip
                editor.apply(shares[i][-1])  # the next layer's keys and residuals see this one
    finally:
        editor.rebuild(list(saved))
    return editor.with_checksums(BatchEdit(batch_id, tuple(tuple(s) for s in shares), {
        "layers": list(layers), "value_s": round(value_s, 4), "seconds": round(time.perf_counter() - t0, 4),
        "mean_steps": sum(r.steps for r in results) / len(results),
    }))
