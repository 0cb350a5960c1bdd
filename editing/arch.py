"""Architecture knowledge, in one table.

Every module path and config key that ROME and causal tracing need lives here and
nowhere else. Orientation of the rewritten weight is decided by the module's type
(``transformers.pytorch_utils.Conv1D`` stores ``(in, out)``, ``nn.Linear`` stores
``(out, in)``), never by its shape.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where each abstract part of a decoder-only transformer lives."""

    layers: str  # ModuleList of decoder blocks
    mlp_out: str  # MLP output projection inside a block; ROME rewrites its weight
    attn: str  # attention module inside a block (its output is the attention output)
    mlp: str  # whole MLP inside a block (its output is the MLP output)
    embed: str  # token embedding
    final_norm: str  # norm before the unembedding
    unembed: str  # output head
    n_layers_key: str  # config attribute holding the number of blocks
    direct_layers: bool = False  # blocks take (hidden, mask, position_embeddings) and can be run from any layer


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    direct_layers=False,
    mlp_out="mlp.down_proj",
    attn="self_attn",
    mlp="mlp",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    n_layers_key="num_hidden_layers",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp_out="mlp.c_proj",
        attn="attn",
        mlp="mlp",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        n_layers_key="n_layer",
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        mlp_out="mlp.fc_out",
        attn="attn",
        mlp="mlp",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        n_layers_key="n_layer",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        mlp_out="mlp.dense_4h_to_h",
        attn="attention",
        mlp="mlp",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="embed_out",
        n_layers_key="num_hidden_layers",
    ),
    "llama": dataclasses.replace(_LLAMA_LIKE, direct_layers=True),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
}


def arch_of(model: nn.Module) -> ArchSpec:
    """The table entry for ``model``; unsupported families raise ``ValueError``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"model family {model_type!r} is not supported; supported: {supported}")
    return ARCHITECTURES[model_type]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Module by dotted name, with a clear ``LookupError`` when it is absent."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise LookupError(f"no module named {name!r} in {type(model).__name__}") from err


def n_layers(model: nn.Module) -> int:
    return int(getattr(model.config, arch_of(model).n_layers_key))


def layer_name(model: nn.Module, layer: int, part: str | None = None) -> str:
    """Dotted name of block ``layer`` or of one of its parts (``mlp_out``, ``attn``, ``mlp``)."""
    spec = arch_of(model)
    base = f"{spec.layers}.{layer}"
    return base if part is None else f"{base}.{getattr(spec, part)}"


def mlp_out_param_name(model: nn.Module, layer: int) -> str:
    """Name (as in ``named_parameters``) of the weight ROME rewrites at ``layer``."""
    return f"{layer_name(model, layer, 'mlp_out')}.weight"


def is_matrix(module: nn.Module) -> bool:
    """True for a module whose weight multiplies activations: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_transposed(module: nn.Module) -> bool:
    """True when the weight is stored ``(in, out)`` (GPT-2's ``Conv1D``), false for ``nn.Linear``."""
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D":
        return True
    raise ValueError(f"cannot tell the weight orientation of module type {type(module).__name__}")


def rank_one_delta(module: nn.Module, value_dir: torch.Tensor, key_dir: torch.Tensor) -> torch.Tensor:
    """The weight change ``value_dir ⊗ key_dir`` laid out like ``module.weight``.

    ``value_dir``: (out,), ``key_dir``: (in,). The layer then maps ``k`` to
    ``W k + value_dir * (key_dir · k)``.
    """
    if is_transposed(module):
        return torch.outer(key_dir, value_dir)  # (in, out)
    return torch.outer(value_dir, key_dir)  # (out, in)


def functional_linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module``'s output for input ``x`` had its weight been ``weight``."""
    bias = getattr(module, "bias", None)
    if is_transposed(module):
        out = x @ weight  # Conv1D: (…, in) @ (in, out)
        return out if bias is None else out + bias
    return torch.nn.functional.linear(x, weight, bias)
