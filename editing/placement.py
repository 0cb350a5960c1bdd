"""Where a model's tensors sit when a ``device_map`` (accelerate) spreads it over devices.

A model loaded with ``device_map="auto"`` has each block on its own device, and accelerate's hooks
move a module's inputs to that device when it runs. Its forward hooks and pre-hooks see the
inputs before that move, so the edit engine never assumes "the model's device": every tensor it
builds goes on the device and dtype of the weight it is about, and the token ids on the device
of the input embeddings. A module offloaded to the CPU (under a GPU map) or to disk keeps its
weights on the ``meta`` device and outside the module; such a layer cannot be edited in place.
"""
from __future__ import annotations

import torch
from torch import nn

from editing.arch import get_module, mlp_out_param_name


def is_offloaded(tensor: torch.Tensor) -> bool:
    """True for a weight whose values are not in the parameter (accelerate offload leaves it on ``meta``)."""
    return tensor.device.type == "meta"


def editable_weight(model: nn.Module, name: str) -> nn.Parameter:
    """The parameter ``name``; ``ValueError`` when it is offloaded (its values are not materialised on a device)."""
    param = model.get_parameter(name)
    if is_offloaded(param):
        where = getattr(model, "hf_device_map", None) or {}
        placed = next((dev for mod, dev in where.items() if name == mod or name.startswith(mod + ".")), "offload")
        raise ValueError(
            f"{name} is offloaded to {placed!r} by the device map, so its weights are not held on a device and "
            "cannot be edited in place; load the model with room for this layer on a GPU or the CPU "
            "(--device-map with more memory, or no device map), or edit another layer"
        )
    return param


def layer_weight(model: nn.Module, layer: int) -> nn.Parameter:
    """The weight ROME rewrites at ``layer`` (the MLP output projection), refused when offloaded."""
    return editable_weight(model, mlp_out_param_name(model, layer))


def layer_device(model: nn.Module, layer: int) -> torch.device:
    return layer_weight(model, layer).device


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the device the input embeddings run on (accelerate's execution device if offloaded)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    return embed.weight.device


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices holding the model's materialised parameters, in order of first use."""
    seen: dict[torch.device, None] = {}
    for param in model.parameters():
        if not is_offloaded(param):
            seen.setdefault(param.device, None)
    return list(seen)


def materialised(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the state-dict entry ``name``), read from accelerate's offload store when it is on ``meta``."""
    if not is_offloaded(tensor):
        return tensor
    owner, _, leaf = name.rpartition(".")
    hook = getattr(get_module(model, owner) if owner else model, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise ValueError(f"{name} is on the meta device and no offload store holds it")
    return weights[leaf]
