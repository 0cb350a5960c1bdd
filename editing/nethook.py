"""Hooks that never outlive their ``with`` block.

Every hook acts only in the thread that installed it: a chat generating in another thread
runs the same modules untouched while an edit is being computed.
"""
from __future__ import annotations

import threading

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from editing.arch import functional_linear, get_module


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the needed layer has run."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (new, *output[1:])
    return new


@contextmanager
def edit_output(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    """Pass the module's (first) output through ``fn``; a returned tensor replaces it."""
    module = get_module(model, name)
    owner = threading.get_ident()

    def hook(_mod: nn.Module, _inp: Any, output: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_input(model: nn.Module, name: str, stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the module's first positional input in ``box["input"]``; optionally stop the pass."""
    module = get_module(model, name)
    box: dict[str, torch.Tensor] = {}
    owner = threading.get_ident()

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() != owner:
            return
        box["input"] = args[0]
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def run_until(model: nn.Module, **inputs: Any) -> None:
    """Run a forward pass that a ``stop=True`` hook ends early."""
    try:
        model(**inputs)
    except StopForward:
        pass


@contextmanager
def replace_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the modules owning ``weights`` (parameter name -> tensor) with those weights instead.

    The parameters themselves are untouched; only this thread's forward passes see the swap. Each
    replacement computes on its own tensor's device and hands its output on where the module's went.
    """
    owner = threading.get_ident()
    handles = []

    def make_hook(weight: torch.Tensor) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            # Under a device map the hook sees the input before accelerate moved it to the module's device.
            out = functional_linear(module, args[0].to(weight.device), weight)
            return _replace_first(output, out.to(_first(output).device))

        return hook

    try:
        for name, weight in weights.items():
            module = get_module(model, name.rsplit(".", 1)[0])
            handles.append(module.register_forward_hook(make_hook(weight)))
        yield
    finally:
        for handle in handles:
            handle.remove()
