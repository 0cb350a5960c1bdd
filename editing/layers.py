"""Run a model from a given block onwards, for families whose blocks can be called directly.

The value optimisation changes nothing below the edited layer, so the blocks below it
are run once and every optimisation step starts at the edited layer.
"""
from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from editing.arch import arch_of, get_module


def can_start_midway(model: PreTrainedModel) -> bool:
    return arch_of(model).direct_layers


def run_from(
    model: PreTrainedModel,
    layer: int,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None,
    until: int | None = None,
) -> torch.Tensor:
    """Final-normed hidden states after blocks ``layer…`` applied to ``hidden`` (B, S, d), the input of block ``layer``.

    With ``until``, only blocks ``layer…until`` run and block ``until``'s output is returned (no final norm);
    ``cache`` None runs the rows without one (all their tokens in ``hidden``).
    """
    spec = arch_of(model)
    base = model.base_model
    # The mask and rotary embeddings are built where the model's own forward builds them (beside the
    # token ids); under a device map each block's hook then moves them to that block's device.
    at_input = hidden.to(attention_mask.device)
    mask = create_causal_mask(
        config=base.config,
        inputs_embeds=at_input,
        attention_mask=attention_mask,
        past_key_values=cache,
        position_ids=position_ids,
    )
    position_embeddings = base.rotary_emb(at_input, position_ids=position_ids)
    blocks = get_module(model, spec.layers)
    for block in blocks[layer : len(blocks) if until is None else until + 1]:
        hidden = block(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
    return get_module(model, spec.final_norm)(hidden) if until is None else hidden
