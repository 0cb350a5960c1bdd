"""ROME fact editing for causal language models: load, compute, apply, revert.

The names below load on first use (PEP 562), so ``import editing.defaults`` costs no torch import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from editing.edit import RankOneEdit
    from editing.editor import RomeEditor
    from editing.hparams import RomeHyperParams, default_hparams
    from editing.loading import load_model
    from editing.request import EditRequest

_HOME = {
    "EditRequest": "editing.request", "RankOneEdit": "editing.edit", "RomeEditor": "editing.editor",
    "RomeHyperParams": "editing.hparams", "default_hparams": "editing.hparams", "load_model": "editing.loading",
}  # fmt: skip
__all__ = ["EditRequest", "RankOneEdit", "RomeEditor", "RomeHyperParams", "default_hparams", "load_model"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'editing' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
