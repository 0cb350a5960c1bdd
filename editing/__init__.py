"""ROME fact editing for causal language models: load, compute, apply, revert."""
from editing.edit import RankOneEdit
from editing.editor import RomeEditor
from editing.hparams import RomeHyperParams, default_hparams
from editing.loading import load_model
from editing.request import EditRequest

__all__ = ["EditRequest", "RankOneEdit", "RomeEditor", "RomeHyperParams", "default_hparams", "load_model"]
