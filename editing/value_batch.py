"""Optimise many facts' value deltas in one loop (MEMIT's z_i = h_i + δ_i), their rows in one padded batch.

Facts do not interact: fact i's δ_i is added only at its own rows' subject-last-token, and the loss
summed over facts has, for δ_i, exactly fact i's own gradient (target NLL + KL on its own KL prompt +
its norm term, ``editing.value``'s pieces). Adam's moments are per element and its step count is
shared by the facts still moving, which have all moved since step 0, so each fact follows its solo
optimisation (``optimise_value``) up to float rounding from the padding. A fact whose early-stop
criterion is met is frozen at the δ it was evaluated with, as the solo loop returns it, and its rows
leave the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from editing.hparams import RomeHyperParams
from editing.placement import layer_weight
from editing.rome import Progress, ValueResult, value_at
from editing.value import kl_term, norm_term
from editing.value_forward import Fact, Forward, Layout, build_forward

GROUP = 4  # facts per loop; measured fastest here (bench/value_batch_speed.py: 4 beat 8 and 32), and it bounds memory


def optimise_values(
    model: PreTrainedModel,
    hp: RomeHyperParams,
    keys: torch.Tensor,
    facts: Sequence[Fact],
    pad_id: int,
    method: str = "fast",
    progress: Progress | None = None,
    group: int = GROUP,
) -> list[ValueResult]:
    """``optimise_value`` for every fact (``keys`` (F, d_in), ``facts[i]`` = (value rows, KL row)), batched.

    The facts are optimised ``group`` at a time (each group one loop, the facts sorted by suffix length
    so a loop's rows need little padding); as they do not interact, the grouping changes nothing but
    memory and speed. The model's weights are unchanged on return.
    """
    if len(keys) != len(facts):
        raise ValueError(f"{len(keys)} keys for {len(facts)} facts")
    if group < 1:
        raise ValueError("group must be at least 1")
    # Facts of similar suffix length share a loop: every row of a loop is padded to its longest suffix.
    order = sorted(range(len(facts)), key=lambda i: suffix_length(facts[i]))
    results: dict[int, ValueResult] = {}
    for start in range(0, len(facts), group):
        part = order[start : start + group]
        part_facts = [facts[i] for i in part]

        def part_progress(stage: str, fraction: float, start: int = start, size: int = len(part)) -> None:
            if progress is not None:
                progress(stage, min(1.0, (start + fraction * size) / len(facts)))

        forward = build_forward(method, model, hp.layer, part_facts, pad_id)
        found = _optimise_group(model, hp, keys[torch.tensor(part)], part_facts, forward, part_progress, part)
        results.update(zip(part, found))
    return [results[i] for i in range(len(facts))]


def suffix_length(fact: Fact) -> int:
    """The most tokens a step runs for one of the fact's rows: from its subject's last token to its end."""
    values, kl = fact
    return max(len(r.input_ids) - r.lookup for r in (*values, kl))


def _per_fact_nll(lay: Layout, target_logp: torch.Tensor, targets: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """(A,): each active fact's mean over its value rows of the row's mean target NLL, as ``optimise_value``."""
    rows = lay.row_of[targets]
    n_rows = len(lay.rows)
    per_row = torch.zeros(n_rows, device=target_logp.device).index_add(0, rows, target_logp)
    counts = torch.zeros(n_rows, device=target_logp.device).index_add(0, rows, torch.ones_like(target_logp))
    is_value = counts > 0
    facts = lay.fact_of_row[is_value]
    sums = torch.zeros(int(lay.fact_of_row.max()) + 1, device=target_logp.device)
    sums = sums.index_add(0, facts, per_row[is_value] / counts[is_value])
    n_value = torch.bincount(facts, minlength=len(sums)).clamp(min=1)
    return -(sums / n_value)[active]


def _optimise_group(
    model: PreTrainedModel,
    hp: RomeHyperParams,
    keys: torch.Tensor,
    facts: Sequence[Fact],
    forward: Forward,
    progress: Progress,
    numbers: Sequence[int],
) -> list[ValueResult]:
    """One loop over ``facts``: Adam on δ (F, d), each fact clamped, stopped and frozen on its own."""
    device = layer_weight(model, hp.layer).device  # δ, its optimiser state and the loss live with the edited layer
    keys = keys.to(device)
    lay = Layout.of(facts, device)
    v0 = torch.stack([value_at(model, hp.layer, k) for k in keys])  # (F, d)
    v0_norms = [float(x) for x in v0.norm(dim=1)]
    max_norm = hp.clamp_factor * v0.norm(dim=1)  # (F,)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    moving = torch.ones(len(facts), dtype=torch.bool, device=device)
    kl_ref: torch.Tensor | None = None  # (F, V): the original distributions, from step 0 (δ = 0)
    losses: list[list[float]] = [[] for _ in facts]
    for step in range(hp.steps):
        opt.zero_grad()
        active = moving.nonzero()[:, 0]  # (A,)
        target_logp, kl_logp = forward(delta, active)
        nll = _per_fact_nll(lay, target_logp, lay.select(active)[2], active)  # (A,)
        if kl_ref is None:
            kl_ref = kl_logp.detach()
        loss = torch.stack([
            nll[a] + hp.kl_factor * kl_term(kl_ref[i], kl_logp[a], hp.kl_direction)
            + norm_term(delta[i], v0_norms[i], hp)
            for a, i in enumerate(active.tolist())
        ])  # fmt: skip  # (A,)
        progress("value", min(1.0, (step + 1) / hp.steps))
        for i, step_nll, step_loss in zip(active.tolist(), nll.detach().tolist(), loss.detach().tolist()):
            losses[i].append(step_nll)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"value optimisation of fact {numbers[i] + 1} diverged at step {step} (loss {step_loss})")
        watched = nll if hp.early_stop_on == "nll" else loss
        moving[active[watched.detach() < hp.early_stop_loss]] = False
        if not moving.any() or step == hp.steps - 1:
            break
        frozen = delta.detach()[~moving].clone()  # Adam's momentum would still move them
        loss[moving[active]].sum().backward()
        opt.step()
        with torch.no_grad():
            delta[~moving] = frozen
            norms = delta.norm(dim=1)
            over = moving & (norms > max_norm)
            delta[over] *= (max_norm[over] / norms[over])[:, None]
    return [
        ValueResult(delta[i].detach().clone(), v0_norms[i], tuple(ls), len(ls), math.exp(-ls[-1]))
        for i, ls in enumerate(losses)
    ]
