"""The edited model as standard files: a merged checkpoint, or the edits as an exact LoRA adapter.

Both are built from copies; the live model's weights are never touched. A LoRA adapter holds
``ΔW = B A · (alpha / r)``; n rank-one edits ``v_i ⊗ k_i`` of one matrix are the rank-n product
``B = [v_1 … v_n]`` (d_out, n), ``A = [k_1; …; k_n]`` (n, d_in), with ``alpha = r`` so the scaling is 1.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from editing.arch import get_module, is_transposed
from editing.edit import RankOneEdit

log = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_merged(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, weights: Mapping[str, torch.Tensor], dest: Path
) -> None:
    """``save_pretrained`` (safetensors, config, generation config) of ``model`` with ``weights`` in place of its own.

    ``weights``: parameter name -> tensor shaped like the parameter. The model is not modified. A model
    dequantised from GGUF still names its source quantisation in its config, which transformers refuses to
    save and a reader would try to apply; the checkpoint is written through a weightless twin without it.
    """
    state = model.state_dict()
    for name, tensor in weights.items():
        if name not in state or state[name].shape != tensor.shape:
            raise ValueError(f"{name} is not a parameter of this model's shape; cannot export it")
        state[name] = tensor
    plain_twin(model).save_pretrained(dest, state_dict=state)
    tok.save_pretrained(dest)


def plain_twin(model: PreTrainedModel) -> PreTrainedModel:
    """The same architecture and generation config on the meta device, its config free of any quantisation."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


def lora_factors(model: PreTrainedModel, edits: Sequence[RankOneEdit]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> ``(lora_A (r, d_in), lora_B (d_out, r))``, float32, with ``B @ A = Σ value_dir ⊗ key_dir``."""
    grouped: dict[str, list[RankOneEdit]] = {}
    for edit in edits:
        if not edit.param_name.endswith(".weight"):
            raise ValueError(f"{edit.param_name} is not a module weight; it cannot be written as a LoRA adapter")
        grouped.setdefault(edit.param_name.removesuffix(".weight"), []).append(edit)
    factors = {}
    for module_name, group in grouped.items():
        get_module(model, module_name)  # a LookupError names a module this model lacks
        lora_a = torch.stack([e.key_dir.float().cpu() for e in group])  # (r, d_in)
        lora_b = torch.stack([e.value_dir.float().cpu() for e in group], dim=1)  # (d_out, r)
        factors[module_name] = (lora_a.contiguous(), lora_b.contiguous())
    return factors


def lora_config(model: PreTrainedModel, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                base_name: str) -> Any:  # fmt: skip
    """PEFT's ``LoraConfig`` for ``factors``: scaling 1 everywhere, per-module ranks where they differ."""
    from peft import LoraConfig

    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    others = {name: r for name, r in ranks.items() if r != common}
    transposed = {is_transposed(get_module(model, name)) for name in factors}
    if len(transposed) != 1:
        raise ValueError("the edited modules mix Conv1D and Linear weights; one adapter cannot describe both")
    config = LoraConfig(
        r=common, lora_alpha=common, rank_pattern=others, alpha_pattern=dict(others), target_modules=sorted(factors),
        lora_dropout=0.0, bias="none", fan_in_fan_out=transposed.pop(), task_type="CAUSAL_LM",
        base_model_name_or_path=base_name, inference_mode=True,
    )  # fmt: skip
    return config


def save_lora(model: PreTrainedModel, edits: Sequence[RankOneEdit], base_name: str, dest: Path) -> dict[str, int]:
    """Write ``edits`` as a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``); return the ranks.

    ``PeftModel.from_pretrained(base, dest)`` adds exactly the edits' updates (scaling 1). The model is not modified.
    """
    if not edits:
        raise ValueError("there are no edits to write as an adapter; choose applied edits with --ids, or export hf")
    factors = lora_factors(model, edits)
    config = lora_config(model, factors, base_name)
    tensors = {}
    for name, (lora_a, lora_b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(dest))  # adapter_config.json
    return {name: int(a.shape[0]) for name, (a, _) in factors.items()}

