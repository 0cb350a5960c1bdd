"""Arithmetic of a forward pass (traces, key statistics): float32, or bfloat16 matrix products on a twin.

The twin shares every parameter but the matrices (``nn.Linear``, ``Conv1D``), which it holds in
bfloat16, and runs under autocast, so the residual stream, norms and softmax stay float32. On a
CPU with native bfloat16 (AVX512-BF16, AMX) its matrix products run several times faster.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from editing.arch import is_matrix
from editing.defaults import PRECISIONS
from editing.nethook import replace_weights


def resolve_precision(precision: str, model: nn.Module) -> str:
    """``"auto"`` → ``"bfloat16"`` on a CPU with native bfloat16 matrix products (a model not placed by a device
    map), else ``"float32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if getattr(model, "hf_device_map", None):  # placed by accelerate: its hooks are not the twin's to copy
        return "float32"
    on_cpu = next(model.parameters()).device.type == "cpu"
    return "bfloat16" if on_cpu and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def bfloat16_twin(model: nn.Module, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` sharing every parameter but the matrices, which it holds in bfloat16.

    Built for each trace from the current weights (0.16 s for the default model) and dropped after
    it, so it never goes stale and its memory (half the matrices' size) is held only while tracing.
    Embeddings, norms and biases are shared, not copied. A model whose matrices are already
    bfloat16 is its own twin. ``weights`` (parameter name -> tensor) replace those matrices in the
    twin: thread-local weight swaps (``nethook.replace_weights``) are hooks, which the twin drops.
    """
    weights = dict(weights or {})
    if not weights and all(m.weight.dtype == torch.bfloat16 for m in model.modules() if is_matrix(m)):
        return model
    memo = {id(p): p for p in model.parameters()}  # deepcopy shares these instead of copying
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                      module._forward_pre_hooks_with_kwargs):  # fmt: skip
            hooks.clear()  # another thread's live hooks must not be copied into the twin
    for name, module in twin.named_modules():
        if is_matrix(module):
            weight = weights.pop(f"{name}.weight", module.weight)
            module.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
    if weights:
        raise KeyError(f"no such matrices: {sorted(weights)}")
    return twin


@contextmanager
def arithmetic(
    model: nn.Module, precision: str, weights: Mapping[str, torch.Tensor] | None = None
) -> Iterator[nn.Module]:
    """The model to run in ``precision``, with ``weights`` (parameter name -> tensor) in place of its own:
    the model itself (``weights`` swapped in this thread), or its bfloat16 twin under autocast."""
    if precision == "float32":
        with replace_weights(model, dict(weights or {})):
            yield model
        return
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        yield bfloat16_twin(model, weights)
