"""Optimise the value delta: the MLP output change at the subject's last token that makes the model say the target.

The forward passes (``plain``, ``prefix``, ``fast``) live in ``editing.value_forward``, shared with the
batched optimisation of many facts (``editing.value_batch``); the loss pieces (``kl_term``,
``norm_term``) live here and are used by both.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from editing.hparams import RomeHyperParams
from editing.placement import layer_weight
from editing.rome import Progress, ValueResult, value_at
from editing.rows import Row
from editing.value_forward import build_forward, target_index
from editing.value_stop import StopRule


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
    batched = build_forward(method, model, hp.layer, [(rows, kl)], pad_id)
    device = layer_weight(model, hp.layer).device  # delta, its optimiser state and the loss live with the edited layer
    key = key.to(device)
    only = torch.zeros(1, dtype=torch.long, device=device)
    v0_norm = float(value_at(model, hp.layer, key).norm())
    max_norm = hp.clamp_factor * v0_norm
    row_of = target_index(rows, device)[0]
    counts = torch.bincount(row_of, minlength=len(rows)).float()
    delta = torch.zeros_like(value_at(model, hp.layer, key), requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    kl_ref: torch.Tensor | None = None
    losses: list[float] = []
    nll = torch.tensor(float("inf"))
    limit = hp.steps if stop is None else stop.max_steps
    for step in range(limit):
        opt.zero_grad()
        target_logp, kl_logps = batched(delta[None], only)  # a batch of one fact
        kl_logp = kl_logps[0]
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
