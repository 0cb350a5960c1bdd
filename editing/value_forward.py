"""Forward passes of the value optimisation, for one fact or many at once.

Each fact brings its value rows and its KL row (``Fact``); all facts' rows form one right-padded
batch, fact i's rows first ``[*rows_i, kl_i]``, then fact i+1's. ``delta`` is (F, d): row r gets
``delta[fact_of_row[r]]`` added to the edited MLP's output at its subject's last token and nowhere
else, so facts do not interact. ``forward(delta, active)`` runs only the rows of the facts whose
indices are in ``active`` (ascending), so a fact that has converged stops costing compute.

Three strategies, the same numbers to float tolerance:
- ``plain``: every step runs the rows through the whole model (the reference procedure);
- ``prefix``: the tokens before the subject's last token cannot see the delta, so their keys and
  values are computed once (a KV cache) and every step runs only the remaining suffix, with the
  unembedding applied only where the loss needs it;
- ``fast``: ``prefix``, and for families whose blocks can be called directly, the blocks below
  the edited layer run once instead of every step.

Padding is on the right everywhere: causal attention keeps every real token blind to the pads after
it, and the pads inside the cached prefix are masked for the suffix tokens that follow them. Under a
device map (``editing.placement``) token ids go to the input embeddings' device, every index is moved
to the tensor it indexes, and the returned log-probs are on ``delta``'s device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache, PreTrainedModel

from editing.arch import layer_name
from editing.layers import can_start_midway, run_from
from editing.nethook import capture_input, edit_output, run_until
from editing.placement import input_device
from editing.rome import pad_batch
from editing.rows import Row

Fact = tuple[Sequence[Row], Row]  # (value rows, KL row)
# (delta (F, d), active fact indices (A,)) -> (log-probs of the active facts' target tokens (n_targets,),
#                                              log-probs at each active fact's KL position (A, V))
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def target_index(rows: Sequence[Row], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_of, pos, ids)``, each (n_targets,): every target token's row, position and token id."""
    row_of = [i for i, r in enumerate(rows) for _ in r.target_positions]
    pos = [p for r in rows for p in r.target_positions]
    ids = [t for r in rows for t in r.target_ids]
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return as_t(row_of), as_t(pos), as_t(ids)


@dataclass(frozen=True)
class Layout:
    """Where each fact's rows and target tokens sit in the batch."""

    rows: tuple[Row, ...]  # every fact's value rows then its KL row, fact after fact
    fact_of_row: torch.Tensor  # (B,)
    kl_rows: torch.Tensor  # (F,) the row of each fact's KL prompt
    row_of: torch.Tensor  # (n_targets,) the value row of each target token
    pos: torch.Tensor  # (n_targets,) the position predicting it
    ids: torch.Tensor  # (n_targets,) the token

    @classmethod
    def of(cls, facts: Sequence[Fact], device: torch.device) -> Layout:
        rows = tuple(r for values, kl in facts for r in (*values, kl))
        fact_of_row = [i for i, (values, _) in enumerate(facts) for _ in range(len(values) + 1)]
        ends = torch.tensor([len(values) + 1 for values, _ in facts]).cumsum(0)
        kl_rows = (ends - 1).tolist()  # each fact's last row
        is_kl = set(kl_rows)
        # A KL row's position is not a target: give it no target tokens here.
        row_of, pos, ids = target_index([Row((), 0, (), ()) if i in is_kl else r for i, r in enumerate(rows)], device)
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(rows, as_t(fact_of_row), as_t(kl_rows), row_of, pos, ids)

    def select(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, target_rows, targets, kl_rows)`` for the facts ``active``: the batch rows they own, and
        for each of their target tokens and KL prompts, its row within those rows."""
        rows = torch.isin(self.fact_of_row, active).nonzero()[:, 0]  # (b,)
        local = torch.full_like(self.fact_of_row, -1)
        local[rows] = torch.arange(len(rows), device=rows.device)
        targets = torch.isin(self.fact_of_row[self.row_of], active).nonzero()[:, 0]
        return rows, local[self.row_of[targets]], targets, local[self.kl_rows[active]]


def _take(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """``x[rows]`` along the batch, with the index on ``x``'s device (a slice: every row, no copy)."""
    return x[rows] if isinstance(rows, slice) else x[rows.to(x.device)]


def _at(x: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    return x[tuple(i.to(x.device) for i in index)]


def _unembed(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def plain_forward(model: PreTrainedModel, layer: int, facts: Sequence[Fact], pad_id: int) -> Forward:
    lay = Layout.of(facts, torch.device("cpu"))  # indices; each moved to the tensor it indexes
    ids, mask = pad_batch([r.input_ids for r in lay.rows], pad_id, input_device(model))  # (B, T)
    lookups = torch.tensor([r.lookup for r in lay.rows])
    kl_pos = torch.tensor([kl.target_positions[0] for _, kl in facts])

    def forward(delta: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        active = active.cpu()
        rows, t_rows, targets, k_rows = lay.select(active)
        shift = _take(delta, lay.fact_of_row[rows])  # (b, d)

        def add_delta(out: torch.Tensor) -> torch.Tensor:
            at = (torch.arange(len(rows), device=out.device), lookups[rows].to(out.device))
            out = out.clone()
            out[at] = out[at] + shift.to(out.device, out.dtype)
            return out

        with edit_output(model, layer_name(model, layer, "mlp_out"), add_delta):
            logits = model(input_ids=_take(ids, rows), attention_mask=_take(mask, rows), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (b, T, V), on the unembedding's device
        picked = _at(logp, t_rows, lay.pos[targets], lay.ids[targets])
        return picked.to(delta.device), _at(logp, k_rows, kl_pos[active]).to(delta.device)

    return forward


def fast_forward(
    model: PreTrainedModel, layer: int, facts: Sequence[Fact], pad_id: int, skip_below: bool = True
) -> Forward:
    device = input_device(model)
    lay = Layout.of(facts, torch.device("cpu"))  # indices; each moved to the tensor it indexes
    prefixes = [r.input_ids[: r.lookup] for r in lay.rows]
    suffixes = [r.input_ids[r.lookup :] for r in lay.rows]
    n_prefix = torch.tensor([len(p) for p in prefixes], device=device)
    past: list[tuple[torch.Tensor, torch.Tensor]] = []
    width = max(len(p) for p in prefixes)
    if width:
        # Right-padded with no mask: causal attention keeps real tokens blind to the pads after them.
        pre_ids, pre_mask = pad_batch([p or (pad_id,) for p in prefixes], pad_id, device)
        with torch.no_grad():
            cache = model.base_model(input_ids=pre_ids, use_cache=True).past_key_values
        past = [(lay_kv.keys, lay_kv.values) for lay_kv in cache.layers]
        pre_mask[n_prefix == 0] = 0
    suf_ids, suf_mask = pad_batch(suffixes, pad_id, device)
    mask = torch.cat([pre_mask, torch.ones_like(suf_mask)], 1) if width else torch.ones_like(suf_mask)
    positions = n_prefix[:, None] + torch.arange(suf_ids.shape[1], device=device)[None]  # (B, S)
    pos = lay.pos - n_prefix.cpu()[lay.row_of]  # within the suffix
    kl_pos = torch.tensor([kl.target_positions[0] - kl.lookup for _, kl in facts])

    def fresh_cache(rows: torch.Tensor | slice) -> DynamicCache:
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(past):
            cache.update(_take(k, rows), _take(v, rows), i)
        return cache

    midway = skip_below and bool(past) and can_start_midway(model)
    if midway:
        # The input of the edited block at the suffix tokens does not depend on delta: compute it once.
        with torch.no_grad(), capture_input(model, layer_name(model, layer), stop=True) as box:
            run_until(model.base_model, input_ids=suf_ids, past_key_values=fresh_cache(slice(None)), use_cache=True,
                      attention_mask=mask, position_ids=positions)  # fmt: skip
        start_hidden = box["input"].detach()  # (B, S, d)

    def forward(delta: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        active = active.cpu()
        picked_rows, t_rows, targets, k_rows = lay.select(active)
        rows = picked_rows if len(picked_rows) < len(lay.rows) else slice(None)  # all rows: no copies
        shift = _take(delta, lay.fact_of_row[rows])[:, None]  # (b, 1, d)

        def add_delta(out: torch.Tensor) -> torch.Tensor:
            return torch.cat([out[:, :1] + shift.to(out.device, out.dtype), out[:, 1:]], 1)

        with edit_output(model, layer_name(model, layer, "mlp_out"), add_delta):
            if midway:
                hidden = run_from(model, layer, _take(start_hidden, rows), _take(mask, rows), _take(positions, rows),
                                  fresh_cache(rows))  # fmt: skip
            else:
                hidden = model.base_model(
                    input_ids=_take(suf_ids, rows), past_key_values=fresh_cache(rows) if past else None,
                    use_cache=bool(past), attention_mask=_take(mask, rows), position_ids=_take(positions, rows),
                ).last_hidden_state  # (b, S, d), on the final norm's device
        picked = torch.cat([_at(hidden, t_rows, pos[targets]), _at(hidden, k_rows, kl_pos[active])], 0)
        logp = torch.log_softmax(_unembed(model, picked), dim=-1)  # on the unembedding's device
        n = len(targets)
        target_logp = _at(logp, torch.arange(n), lay.ids[targets])
        return target_logp.to(delta.device), logp[n:].to(delta.device)

    return forward


BUILDERS: dict[str, Callable[..., Forward]] = {
    "fast": fast_forward, "prefix": partial(fast_forward, skip_below=False), "plain": plain_forward,
}


def build_forward(method: str, model: PreTrainedModel, layer: int, facts: Sequence[Fact], pad_id: int) -> Forward:
    if method not in BUILDERS:
        raise ValueError(f"method must be one of {sorted(BUILDERS)}")
    return BUILDERS[method](model, layer, facts, pad_id)
