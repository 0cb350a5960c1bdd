"""Optimise the value delta: the MLP output change at the subject's last token that makes the model say the target.

Three forward strategies share one optimisation loop:
- ``plain``: every step runs the whole batch through the whole model (the reference procedure);
- ``prefix``: the tokens before the subject's last token cannot see the delta, so their keys and
  values are computed once (a KV cache) and every step runs only the remaining suffix, with the
  unembedding applied only where the loss needs it;
- ``fast``: ``prefix``, and for families whose blocks can be called directly, the blocks below
  the edited layer run once instead of every step.
All give the same numbers to float tolerance.
"""
from __future__ import annotations

import math
from functools import partial
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from editing.arch import layer_name
from editing.hparams import RomeHyperParams
from editing.layers import can_start_midway, run_from
from editing.nethook import capture_input, edit_output, run_until
from editing.placement import input_device, layer_weight
from editing.rome import Progress, ValueResult, add_at, pad_batch, value_at
from editing.rows import Row
from editing.value_stop import StopRule

# delta -> (log-probs of each target token (n_targets,), log-probs at the KL position (V,))
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _target_index(rows: Sequence[Row], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_of = [i for i, r in enumerate(rows) for _ in r.target_positions]
    pos = [p for r in rows for p in r.target_positions]
    ids = [t for r in rows for t in r.target_ids]
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return as_t(row_of), as_t(pos), as_t(ids)


def plain_forward(model: PreTrainedModel, layer: int, rows: Sequence[Row], kl: Row, pad_id: int) -> Forward:
    batch = [*rows, kl]
    ids, mask = pad_batch([r.input_ids for r in batch], pad_id, input_device(model))
    lookups = torch.tensor([r.lookup for r in batch])
    row_of, pos, tgt = _target_index(rows, torch.device("cpu"))

    def forward(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with edit_output(model, layer_name(model, layer, "mlp_out"), partial(add_at, lookups=lookups, delta=delta)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V), on the unembedding's device
        at = logp.device
        picked = logp[row_of.to(at), pos.to(at), tgt.to(at)]
        return picked.to(delta.device), logp[-1, kl.target_positions[0]].to(delta.device)

    return forward


def _unembed(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def fast_forward(
    model: PreTrainedModel, layer: int, rows: Sequence[Row], kl: Row, pad_id: int, skip_below: bool = True
) -> Forward:
    device = input_device(model)
    batch = [*rows, kl]
    prefixes = [r.input_ids[: r.lookup] for r in batch]
    suffixes = [r.input_ids[r.lookup :] for r in batch]
    n_prefix = torch.tensor([len(p) for p in prefixes], device=device)
    past: list[tuple[torch.Tensor, torch.Tensor]] = []
    width = max(len(p) for p in prefixes)
    if width:
        # Right-padded with no mask: causal attention keeps real tokens blind to the pads after them.
        pre_ids, pre_mask = pad_batch([p or (pad_id,) for p in prefixes], pad_id, device)
        with torch.no_grad():
            cache = model.base_model(input_ids=pre_ids, use_cache=True).past_key_values
        past = [(lay.keys, lay.values) for lay in cache.layers]
        pre_mask[n_prefix == 0] = 0
    suf_ids, suf_mask = pad_batch(suffixes, pad_id, device)
    mask = torch.cat([pre_mask, torch.ones_like(suf_mask)], 1) if width else torch.ones_like(suf_mask)
    positions = n_prefix[:, None] + torch.arange(suf_ids.shape[1], device=device)[None]  # (B, S)
    row_of, pos, tgt = _target_index(rows, device)
    pos = pos - n_prefix[row_of]
    kl_pos = kl.target_positions[0] - kl.lookup

    def fresh_cache() -> DynamicCache:
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        return cache

    inputs = {"attention_mask": mask, "position_ids": positions}
    midway = skip_below and bool(past) and can_start_midway(model)
    if midway:
        # The input of the edited block at the suffix tokens does not depend on delta: compute it once.
        with torch.no_grad(), capture_input(model, layer_name(model, layer), stop=True) as box:
            run_until(model.base_model, input_ids=suf_ids, past_key_values=fresh_cache(), use_cache=True, **inputs)
        start_hidden = box["input"].detach()

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, :1] + delta_box[0].to(out.device, out.dtype), out[:, 1:]], 1)

    delta_box: list[torch.Tensor] = []

    def forward(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta_box[:] = [delta]
        with edit_output(model, layer_name(model, layer, "mlp_out"), add_delta):
            if midway:
                hidden = run_from(model, layer, start_hidden, mask, positions, fresh_cache())
            else:
                cache = fresh_cache() if past else None
                hidden = model.base_model(
                    input_ids=suf_ids, past_key_values=cache, use_cache=bool(past), **inputs
                ).last_hidden_state  # (B, S, d)
        at = hidden.device  # the final norm's device
        picked = torch.cat([hidden[row_of.to(at), pos.to(at)], hidden[-1:, kl_pos]], 0)
        logp = torch.log_softmax(_unembed(model, picked), dim=-1)  # on the unembedding's device
        rows_at = torch.arange(len(tgt), device=logp.device)
        return logp[rows_at, tgt.to(logp.device)].to(delta.device), logp[-1].to(delta.device)

    return forward


def kl_term(original: torch.Tensor, edited: torch.Tensor, direction: str) -> torch.Tensor:
    """KL between next-token log-distributions (V,): ``"original||edited"`` (ours) or ``"edited||original"``.

    The reference code (``torch.nn.functional.kl_div(original, edited, log_target=True)``) computes
    KL(edited ‖ original); README, "Value loss", has the measured comparison.
    """
    p, q = (original, edited) if direction == "original||edited" else (edited, original)
    return (p.exp() * (p - q)).sum()


def norm_term(delta: torch.Tensor, v0_norm: float, hp: RomeHyperParams) -> torch.Tensor:
    """``norm_penalty · ‖δ‖ / ‖v0‖^norm_power``: power 1 is scale-free (ours), power 2 is the reference code's."""
    return hp.norm_penalty * delta.norm() / max(v0_norm, 1e-8) ** hp.norm_power


def optimise_value(
    model: PreTrainedModel,
    hp: RomeHyperParams,
    key: torch.Tensor,
    rows: Sequence[Row],
    kl: Row,
    pad_id: int,
    method: str = "fast",
    progress: Progress | None = None,
    stop: StopRule | None = None,
) -> ValueResult:
    """Adam on ``delta`` to minimise target NLL + KL on the essence prompt + a norm penalty; clamped each step.

    Stops early once the target NLL (``early_stop_on="nll"``) or the whole loss (``"loss"``, as the
    reference code) is below ``early_stop_loss``; ``stop`` (``editing.value_stop``) replaces that rule and
    may allow extra steps.
    """
    builders = {"fast": fast_forward, "prefix": partial(fast_forward, skip_below=False), "plain": plain_forward}
    if method not in builders:
        raise ValueError(f"method must be one of {sorted(builders)}")
    forward = builders[method](model, hp.layer, rows, kl, pad_id)
    device = layer_weight(model, hp.layer).device  # delta, its optimiser state and the loss live with the edited layer
    key = key.to(device)
    v0_norm = float(value_at(model, hp.layer, key).norm())
    max_norm = hp.clamp_factor * v0_norm
    row_of = _target_index(rows, device)[0]
    counts = torch.bincount(row_of, minlength=len(rows)).float()
    delta = torch.zeros_like(value_at(model, hp.layer, key), requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    kl_ref: torch.Tensor | None = None
    losses: list[float] = []
    nll = torch.tensor(float("inf"))
    limit = hp.steps if stop is None else stop.max_steps
    for step in range(limit):
        opt.zero_grad()
        target_logp, kl_logp = forward(delta)
        per_row = torch.zeros(len(rows), device=device).index_add(0, row_of, target_logp) / counts
        nll = -per_row.mean()
        if kl_ref is None:
            kl_ref = kl_logp.detach()  # delta is zero on the first step: the original distribution
        loss = nll + hp.kl_factor * kl_term(kl_ref, kl_logp, hp.kl_direction) + norm_term(delta, v0_norm, hp)
        losses.append(nll.item())
        if progress is not None:
            progress("value", min(1.0, (step + 1) / hp.steps))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"value optimisation diverged at step {step} (loss {loss.item()})")
        watched = losses[-1] if hp.early_stop_on == "nll" else loss.item()
        done = watched < hp.early_stop_loss if stop is None else stop(-per_row.detach(), delta.detach(), step)
        if done or step == limit - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    return ValueResult(delta.detach().clone(), v0_norm, tuple(losses), len(losses), math.exp(-losses[-1]))
