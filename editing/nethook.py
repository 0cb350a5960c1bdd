"""Hooks that never outlive their ``with`` block."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from editing.arch import get_module


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

    def hook(_mod: nn.Module, _inp: Any, output: Any) -> Any:
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

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
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
