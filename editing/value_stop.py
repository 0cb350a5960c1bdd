"""When the value optimisation may stop: on the mean or the worst prompt's loss, and (optionally) only
once the greedy answer is the target on the bare prompt and in chat, with a bounded number of extra steps."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from transformers import PreTrainedModel

from editing.arch import layer_name
from editing.hparams import RomeHyperParams
from editing.nethook import edit_output
from editing.placement import input_device
from editing.rome import add_at, pad_batch
from editing.rows import Row


def greedy_check(model: PreTrainedModel, layer: int, rows: Sequence[Row], pad_id: int) -> Callable[[torch.Tensor], bool]:
    """``check(delta)``: with ``delta`` added at each row's subject, is every target token the argmax (greedy)?"""
    ids, mask = pad_batch([r.input_ids for r in rows], pad_id, input_device(model))
    lookups = torch.tensor([r.lookup for r in rows])
    row_of = torch.tensor([i for i, r in enumerate(rows) for _ in r.target_positions])
    pos = torch.tensor([p for r in rows for p in r.target_positions])
    want = torch.tensor([t for r in rows for t in r.target_ids])

    @torch.no_grad()
    def check(delta: torch.Tensor) -> bool:
        with edit_output(model, layer_name(model, layer, "mlp_out"), partial(add_at, lookups=lookups, delta=delta)):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        at = logits.device  # the unembedding's device
        return bool((logits[row_of.to(at), pos.to(at)].argmax(-1) == want.to(at)).all())

    return check


class StopRule:
    """Called each step with the per-prompt NLL (``(n_rows,)``), the current delta and the step index."""

    def __init__(self, hp: RomeHyperParams, check: Callable[[torch.Tensor], bool] | None = None) -> None:
        self.hp, self.check = hp, check if hp.greedy_check > 0 else None
        self.max_steps = hp.steps + (hp.greedy_check if self.check is not None else 0)
        self.checks = 0  # how many greedy checks ran

    def __call__(self, per_row_nll: torch.Tensor, delta: torch.Tensor, step: int) -> bool:
        loss = per_row_nll.max() if self.hp.stop_on == "worst" else per_row_nll.mean()
        if float(loss) >= self.hp.early_stop_loss and step < self.hp.steps - 1:
            return False
        if self.check is None:
            return True
        self.checks += 1
        return self.check(delta)
