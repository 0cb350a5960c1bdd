"""ROME's three steps: the key k*, the value delta, and the rank-one update.

The update uses the averaged key k* on both sides (Gupta et al. 2024, "Rebuilding ROME"):
``W' = W + delta (C^-1 k*)^T / ((C^-1 k*)^T k*)``, so ``W' k* = W k* + delta``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from editing.arch import get_module, layer_name
from editing.nethook import capture_input, run_until
from editing.placement import input_device, layer_weight
from editing.rows import Row

Progress = Callable[[str, float], None]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(ids, mask)``, both (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


def add_at(out: torch.Tensor, lookups: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``out`` (B, T, d) with ``delta`` (d,) added at each row's ``lookups`` position, on ``out``'s device and dtype."""
    lookups = lookups.to(out.device)
    arange = torch.arange(len(lookups), device=out.device)
    out = out.clone()
    out[arange, lookups] = out[arange, lookups] + delta.to(out.device, out.dtype)
    return out


def compute_key(model: PreTrainedModel, layer: int, rows: Sequence[Row], pad_id: int) -> torch.Tensor:
    """k*: the rewritten projection's input at the subject's last token, averaged over rows. (d_in,) float32, on the layer's device."""
    return row_keys(model, layer, rows, pad_id).mean(0)


def length_groups(lengths: Sequence[int], waste: float = 0.25) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, longest first: padding a group to its longest
    row adds at most ``waste`` × its real tokens (a row alone always forms a group).

    One padded pass over rows of very different lengths mostly computes pads: an edit's context
    rows have about 20 tokens and its chat rows 40 to 50.
    """
    groups: list[list[int]] = []
    real = 0  # the real tokens of the last group
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= (1 + waste) * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


@torch.no_grad()
def row_keys(model: PreTrainedModel, layer: int, rows: Sequence[Row], pad_id: int) -> torch.Tensor:
    """Each row's key, the rewritten projection's input at its lookup token. (B, d_in) float32, in ``rows`` order.

    Rows of similar length share a padded forward pass (``length_groups``); a row's key does not
    depend on the rows beside it (right padding, causal attention).
    """
    weight = layer_weight(model, layer)
    keys: list[torch.Tensor | None] = [None] * len(rows)
    for group in length_groups([len(r.input_ids) for r in rows]):
        ids, mask = pad_batch([rows[i].input_ids for i in group], pad_id, input_device(model))
        with capture_input(model, layer_name(model, layer, "mlp_out"), stop=True) as box:
            run_until(model, input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = box["input"]  # (b, T, d_in), wherever the block before left it (a pre-hook runs before accelerate moves it)
        lookups = torch.tensor([rows[i].lookup for i in group], device=hidden.device)
        found = hidden[torch.arange(len(group), device=hidden.device), lookups].float().to(weight.device)  # (b, d_in)
        for i, key in zip(group, found):
            keys[i] = key
    return torch.stack(keys)  # type: ignore[arg-type]


@torch.no_grad()
def value_at(model: PreTrainedModel, layer: int, key: torch.Tensor) -> torch.Tensor:
    """The projection's output for ``key`` (bias included). (d_out,) float32, on the layer's device."""
    module = get_module(model, layer_name(model, layer, "mlp_out"))
    weight = layer_weight(model, layer)
    return module(key.to(weight.device, weight.dtype).unsqueeze(0))[0].float().to(weight.device)


def factor_cov(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LU factors of C in float64 on the CPU, computed once per layer so each edit's solve is cheap.

    A singular or non-finite C raises ``FloatingPointError``: the service records the edit as refused.
    """
    cov = cov.double().cpu()
    if not torch.isfinite(cov).all():
        raise FloatingPointError("the key statistics C contain non-finite values")
    try:
        return torch.linalg.lu_factor(cov)
    except RuntimeError as err:  # torch.linalg.LinAlgError: C is singular
        raise FloatingPointError(f"the key statistics C are singular ({err})") from err


def rank_one_factors(
    cov: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, lu: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value_dir, key_dir)`` with ``ΔW = value_dir ⊗ key_dir``: value_dir = delta, key_dir = C⁻¹k* / (k*ᵀ C⁻¹ k*).

    Solved in float64 (with ``lu`` from ``factor_cov(cov)`` when given); returned in float32 on the key's device.
    A degenerate C (``k*ᵀ C⁻¹ k* ≤ 0`` or not finite) raises ``FloatingPointError``.
    """
    k = key.double().cpu()
    factors = lu if lu is not None else factor_cov(cov)
    c_inv_k = torch.linalg.lu_solve(*factors, k[:, None])[:, 0]  # (d_in,)
    denom = torch.dot(c_inv_k, k)
    if not torch.isfinite(denom) or denom <= 0:
        raise FloatingPointError("the key statistics are degenerate for this subject (k*ᵀ C⁻¹ k* ≤ 0)")
    key_dir = (c_inv_k / denom).float().to(key.device)
    return delta.detach().float().clone(), key_dir


@dataclass(frozen=True)
class ValueResult:
    delta: torch.Tensor  # (d_out,) float32, already clamped
    v0_norm: float  # ||W k*||, the scale for the clamp and the norm penalty
    losses: tuple[float, ...]  # target NLL per step
    steps: int  # optimisation steps taken
    target_prob: float  # mean probability of the target tokens at the last evaluated step
